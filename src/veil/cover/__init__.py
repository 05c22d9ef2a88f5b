"""The cover website every stranger sees: nginx 1.22 emulated over HTTP/1.1 and HTTP/2, and the
choice between that built-in site and a relay to a real web server."""
