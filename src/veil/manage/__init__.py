"""Managing a server from outside its event loop: the state directory, users, exported keys;
shared by the CLI and the admin panel."""
