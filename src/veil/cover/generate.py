"""The built-in cover site, generated per install from a seed kept in the server's state.

One site shipped with every server would let one scan list every server (as scans once
listed default Shadowsocks and Trojan pages): same title, same pages, same ETags. Instead
each install draws its own small static site from :class:`SiteSeed`: a personal or small
company site with its own title and wording, pages and their names, sizes, file dates
(so nginx's ``"mtime-size"`` ETags differ), stylesheet, favicon (or none) and robots.txt
(or none). The same seed always gives the same bytes, so a server restarted or upgraded
keeps its site as a real one does.

The draw uses HMAC-SHA256 over the seed (:class:`veil.protocol.seeded.Draw`), not
:mod:`random`, whose algorithms may change between Python versions and would change every
site with them.

Everything here is built from the small vocabulary below; nothing is fetched.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from veil.protocol.seeded import SEED_BYTES, Draw, SiteSeed

__all__ = ["SEED_BYTES", "Draw", "GeneratedFile", "SiteSeed", "fresh_seed", "generate_site",
           "write_site"]

_DAY = 86400
# File dates: the newest file is this many days older than the install (a site copied onto
# a new server), and the oldest up to this many more: a small site updated now and then.
_NEWEST_DAYS = (3, 150)
_SPREAD_DAYS = (40, 900)

@dataclass(frozen=True, slots=True)
class GeneratedFile:
    name: str
    body: bytes
    mtime: int


# ------------------------------------------------------------------------ vocabulary
@dataclass(frozen=True)
class _Theme:
    company: bool
    names: tuple[str, ...]
    taglines: tuple[str, ...]
    posts: tuple[str, ...]
    sentences: tuple[str, ...]
    about: tuple[str, ...]


_PEOPLE = ("Anna", "Tomas", "Mira", "Jonas", "Lena", "Pavel", "Ines", "Karl", "Noor", "Elif",
           "Marek", "Sofia", "David", "Hanna", "Luca", "Petra", "Oskar", "Vera", "Aron", "Maya")
_SURNAMES = ("Berg", "Novak", "Lind", "Weiss", "Costa", "Horvat", "Keller", "Moreau", "Dahl",
             "Brandt", "Kowal", "Silva", "Varga", "Holm", "Franke", "Rossi", "Janssen")
_TOWNS = ("Riverside", "Northgate", "Eastbrook", "Millford", "Harbourview", "Old Town",
          "Lakeside", "Westend", "Hillcrest", "Stonebridge")

_THEMES: tuple[_Theme, ...] = (
    _Theme(False, ("{first}'s Notebook", "Half Stop", "Light and Grain", "{first} {last}",
                   "Contact Sheet", "Slow Shutter"),
           ("photographs and the odd essay", "film, walks and the odd darkroom disaster",
            "notes on photography", "pictures from here and there"),
           ("Scanning film with a cheap macro lens", "A week of grey weather by the sea",
            "Why I still carry a light meter", "Developing black and white at home",
            "Notes from a winter walk", "Choosing a second-hand lens",
            "What I learned from one roll a month", "Printing small"),
           ("The light was flat all day, which suited the subject better than sun would have.",
            "I shot two rolls and kept perhaps six frames, which is about my usual rate.",
            "The lens cost less than a tank of petrol and is sharper than it has any right to be.",
            "Most of the work happened afterwards, at the kitchen table, with a loupe.",
            "If you try this yourself, start with a cheap body you will not worry about.",
            "Nothing here needs special equipment, only patience and a quiet evening.",
            "The negatives are a little thin, but they scan well enough.",
            "I will write more about the process once I have done it a few more times.",
            "Overcast days are underrated for this kind of picture.",
            "A tripod would have helped, but I did not want to carry one that far."),
           ("I take pictures, mostly on film, mostly close to home.",
            "This site is a handful of static files; there is no tracking and no comments.",
            "If you want to say something, write to me; the address is below.")),
    _Theme(False, ("{first}'s Kitchen", "Second Helpings", "The Weekday Cook", "Flour and Salt",
                   "Small Batch"),
           ("recipes that work on a Tuesday", "home cooking, written down", "bread, soup and "
            "whatever is in season", "a cook's notebook"),
           ("A loaf that forgives you", "Soup for a cold week", "Pickling the last of the beans",
            "Learning to love the cast iron pan", "Three ways with lentils",
            "The simplest tomato sauce", "Baking with rye", "Leftover rice, properly"),
           ("It takes about forty minutes, most of which is waiting.",
            "Use whatever stock you have; water works too, with a little more salt.",
            "The dough will look wrong for the first ten minutes. Keep going.",
            "I have made this every week this winter and nobody has complained yet.",
            "Taste as you go; the amounts below are a starting point.",
            "A heavy pot makes all the difference here.",
            "It keeps for three days in the fridge and tastes better on the second.",
            "My grandmother made a version of this without ever measuring anything.",
            "Do not skip the resting time; it is what makes the texture.",
            "Serve it with bread, or with nothing at all."),
           ("I cook for a family of four on a normal budget.",
            "These recipes are the ones that survived a few years of weeknights.",
            "Questions and corrections are welcome by email.")),
    _Theme(False, ("{first} {last}", "Workbench", "{first} writes code", "Yak Shaving",
                   "Side Projects", "Commit Log"),
           ("notes on software and small tools", "things I built and what went wrong",
            "a developer's notebook", "mostly about programming"),
           ("Moving this site to a tiny server", "A shell script I use every day",
            "Notes on writing a small parser", "What I got wrong about caching",
            "Keeping a home server boring", "Backups I actually test",
            "A year with a mechanical keyboard", "Reading old code"),
           ("The first version worked, which was the problem: I stopped thinking about it.",
            "Most of the time went into the error messages, and it was worth it.",
            "There is no clever trick here, only a list of small decisions.",
            "I rewrote it twice before it became short enough to trust.",
            "The logs told me exactly what was wrong, once I read them.",
            "It runs on the smallest plan my provider sells and uses a fraction of it.",
            "If you know a better way, I would like to hear about it.",
            "The code is not public yet; it needs tests before anyone else sees it.",
            "Simple tools that do one thing are easier to keep running for years.",
            "I measured before and after, and the difference was smaller than I hoped."),
           ("I write software for a living and for fun.",
            "This site is built from a few templates and served as plain files.",
            "Opinions here are my own.")),
    _Theme(True, ("{town} Bicycle Repair", "{last} Cycles", "Spoke and Chain",
                  "{town} Bike Workshop"),
           ("repairs and servicing since 2009", "your local bicycle workshop",
            "service, parts and honest advice"),
           ("Spring service checklist", "Opening hours over the holidays",
            "Why your chain wears out", "Choosing tyres for winter",
            "We now service electric bikes", "Bring your old bike back to life"),
           ("Most repairs are done the same day if you bring the bike in before noon.",
            "We only sell parts we would put on our own bikes.",
            "A basic service includes brakes, gears, wheels and a safety check.",
            "Call ahead for larger jobs so we can order parts in time.",
            "Prices include labour; parts are charged separately.",
            "We are happy to explain what we did and why.",
            "Second-hand bikes are checked and come with three months of free adjustments.",
            "The workshop is small, so please collect your bike within a week."),
           ("We are a small independent workshop run by {first} and {first2}.",
            "You can find us near the station; there is a rack outside.",
            "Cash and cards accepted.")),
    _Theme(True, ("{last} & Partners", "{last} Translations", "{town} Language Services",
                  "{first} {last} Translation"),
           ("translation and proofreading", "certified translations, delivered on time",
            "words that travel well"),
           ("Certified translations explained", "How we price a project",
            "Working with technical documents", "Our languages",
            "Turnaround times", "Confidentiality"),
           ("Every translation is checked by a second translator before delivery.",
            "We work mainly with small businesses, lawyers and private clients.",
            "Send us the document and we will reply with a quote within one working day.",
            "Prices depend on length, subject and deadline.",
            "All files are deleted after the project is finished unless you ask otherwise.",
            "We have been working with the same group of translators for many years.",
            "Certified copies can be sent by post or collected from the office."),
           ("The office was founded by {first} {last}.",
            "We are a team of four with a network of trusted freelancers.",
            "Office hours are Monday to Friday, nine to five.")),
    _Theme(True, ("{town} Bakery", "{last}'s Bakery", "The Corner Oven", "Daily Bread {town}"),
           ("bread baked every morning", "sourdough, pastries and coffee",
            "a neighbourhood bakery"),
           ("Our sourdough", "Orders for events", "Seasonal bakes",
            "Allergy information", "Where our flour comes from", "Opening hours"),
           ("We start baking at four so the first loaves are out by seven.",
            "Our sourdough is fermented for at least eighteen hours.",
            "Large orders need two days' notice.",
            "Everything is baked on site in small batches.",
            "Ask at the counter about ingredients; we are happy to help.",
            "We use flour from a mill two hours away.",
            "Whatever is left at closing goes to the food bank down the road."),
           ("The bakery is run by {first} {last} and a small team.",
            "We opened in a former shoe shop and kept the old sign.",
            "Closed on Mondays.")),
)

_ABOUT_NAMES = ("about.html", "about-me.html", "about-us.html", "info.html", "who.html")
_CONTACT_NAMES = ("contact.html", "contact-us.html", "imprint.html")
_CSS_NAMES = ("style.css", "main.css", "site.css", "screen.css", "styles.css")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December")
_FONTS = ("Georgia, serif", "system-ui, sans-serif", "\"Helvetica Neue\", Arial, sans-serif",
          "Palatino, \"Book Antiqua\", serif", "Verdana, sans-serif", "Charter, Georgia, serif",
          "-apple-system, \"Segoe UI\", Roboto, sans-serif")
_ROBOTS = (
    b"User-agent: *\nDisallow:\n",
    b"User-agent: *\nAllow: /\n",
    b"User-agent: *\nDisallow: /drafts/\n",
    b"User-agent: *\nDisallow: /private/\nDisallow: /tmp/\n",
    b"User-agent: GPTBot\nDisallow: /\n\nUser-agent: *\nDisallow:\n",
    b"# robots.txt\nUser-agent: *\nDisallow:\n",
)


# ------------------------------------------------------------------------ the site
def fresh_seed() -> SiteSeed:
    """A seed for a site of this process alone (no state: tests, embedding)."""
    return SiteSeed.new(time.time())


def generate_site(seed: SiteSeed) -> dict[str, GeneratedFile]:
    """The whole site for ``seed``, by file name (flat: no directories)."""
    d = Draw(seed.seed, "veil cover site v1")
    theme = d.choice(_THEMES)
    first, first2 = d.sample(_PEOPLE, 2)
    words = {"first": first, "first2": first2, "last": d.choice(_SURNAMES),
             "town": d.choice(_TOWNS)}
    name = d.choice(theme.names)
    if "{" not in name and d.chance(70):
        # A bare name ("Workbench") is shared by unrelated sites; most say whose it is.
        name += ", {town}" if theme.company else " by {first} {last}"
    title = name.format(**words)
    tagline = d.choice(theme.taglines)
    style = _Style.draw(d)

    # Dates: the newest file some days before the install, the rest spread before it.
    newest = seed.created - d.between(*_NEWEST_DAYS) * _DAY - d.below(_DAY)
    oldest = newest - d.between(*_SPREAD_DAYS) * _DAY

    def when() -> int:
        return oldest + d.below(max(1, newest - oldest))

    post_titles = d.sample(theme.posts, d.between(1 if theme.company else 2, 6))
    dated_names = not theme.company and d.chance(30)
    posts = []
    for post_title in post_titles:
        mtime = when()
        slug = _slug(post_title)
        if dated_names:
            slug = time.strftime("%Y-%m-", time.gmtime(mtime)) + slug
        paragraphs = [" ".join(d.sample(theme.sentences, d.between(2, 4)))
                      for _ in range(d.between(2, 6))]
        posts.append((slug + d.choice((".html", ".html", ".htm")), post_title, mtime,
                      paragraphs))
    posts.sort(key=lambda p: -p[2])

    files: dict[str, GeneratedFile] = {}
    css_name = d.choice(_CSS_NAMES)
    about_name = d.choice(_ABOUT_NAMES[2:] if theme.company else _ABOUT_NAMES[:2]
                          + _ABOUT_NAMES[3:])
    contact_name = d.choice(_CONTACT_NAMES) if theme.company or d.chance(25) else None
    nav = [("/", "Home"), ("/" + about_name, "About")]
    if contact_name:
        nav.append(("/" + contact_name, "Contact"))
    first_year, last_year = time.gmtime(oldest).tm_year, time.gmtime(newest).tm_year
    years = str(last_year) if first_year == last_year else f"{first_year}&ndash;{last_year}"
    page = _Page(style, title, css_name, nav, years, d)

    summaries = []
    for name, post_title, mtime, paragraphs in posts:
        files[name] = GeneratedFile(name, page.render(post_title, _article(
            post_title, mtime, paragraphs, style)), mtime)
        summaries.append(_summary(name, post_title, mtime, paragraphs[0], style))
    intro = f"<p>{_esc(tagline[0].upper() + tagline[1:])}.</p>\n"
    files["index.html"] = GeneratedFile("index.html", page.render(
        None, intro + "".join(summaries), tagline=tagline), newest)
    about = [s.format(**words) for s in theme.about]
    files[about_name] = GeneratedFile(about_name, page.render("About", "".join(
        f"<p>{_esc(s)}</p>\n" for s in about)), when())
    if contact_name:
        user = d.choice(("hello", "info", "mail", first.lower(), "office"))
        domain = _slug(title).replace("-", "")[:20] + d.choice((".com", ".net", ".org", ".eu"))
        files[contact_name] = GeneratedFile(contact_name, page.render("Contact", (
            f"<p>Write to <a href=\"mailto:{user}@{domain}\">{user}@{domain}</a>.</p>\n")),
            when())
    files[css_name] = GeneratedFile(css_name, style.css(d), oldest + d.below(30 * _DAY))
    if d.chance(75):
        files["robots.txt"] = GeneratedFile("robots.txt", d.choice(_ROBOTS), when())
    if d.chance(65):
        files["favicon.ico"] = GeneratedFile("favicon.ico", _favicon(d), oldest)
    return files


def write_site(files: Mapping[str, GeneratedFile], directory: Path) -> None:
    """Write ``files`` into ``directory`` with their modification times (what nginx, given
    that directory as its root, serves byte for byte as the built-in cover does)."""
    directory.mkdir(parents=True, exist_ok=True)
    for f in files.values():
        path = directory / f.name
        path.write_bytes(f.body)
        os.utime(path, (f.mtime, f.mtime))


@dataclass(frozen=True)
class _Style:
    lang: str
    doctype: str
    indent: str
    semantic: bool
    ink: str
    paper: str
    accent: str
    font: str
    width: int
    date_first: bool
    description: bool

    @classmethod
    def draw(cls, d: Draw) -> _Style:
        hue = d.below(360)
        return cls(lang=d.choice(("en", "en", "en-GB", "en-US")),
                   doctype=d.choice(("<!DOCTYPE html>", "<!doctype html>", "<!DOCTYPE HTML>")),
                   indent=d.choice(("", "  ", "    ", "\t")),
                   semantic=d.chance(60),
                   ink=_hsl_hex(hue, d.between(5, 25), d.between(8, 25)),
                   paper=_hsl_hex((hue + 180) % 360, d.between(0, 30), d.between(92, 100)),
                   accent=_hsl_hex((hue + d.between(90, 270)) % 360, d.between(40, 80),
                                   d.between(28, 45)),
                   font=d.choice(_FONTS), width=d.choice((36, 40, 42, 44, 48, 52, 60)),
                   date_first=d.chance(50), description=d.chance(50))

    def css(self, d: Draw) -> bytes:
        i = self.indent or "  "
        rules = [
            ("body", [f"font-family: {self.font}", f"color: {self.ink}",
                      f"background: {self.paper}", f"max-width: {self.width}em",
                      "margin: 0 auto", f"padding: {d.between(1, 3)}em {d.between(1, 2)}em",
                      f"line-height: 1.{d.between(4, 7)}"]),
            ("a", [f"color: {self.accent}"] + (["text-decoration: none"] if d.chance(50) else [])),
            ("h1, h2", [f"line-height: 1.{d.between(1, 3)}"]
             + ([f"font-weight: {d.choice((400, 600, 700))}"] if d.chance(60) else [])),
            ("h1 a", ["color: inherit", "text-decoration: none"]),
            (".meta, .date", [f"color: {self.accent}", f"font-size: 0.{d.between(8, 9)}em"]),
            ("nav a", [f"margin-right: {d.between(1, 3)}em"]),
            ("footer", [f"margin-top: {d.between(2, 5)}em", "font-size: 0.85em"]),
        ]
        if d.chance(50):
            rules.append(("img", ["max-width: 100%", "height: auto"]))
        if d.chance(40):
            rules.append(("@media (max-width: 600px)", [f"body {{ padding: 0 {d.between(1, 4)}"
                                                          "% }"]))
        compact = d.chance(25)
        out = []
        for selector, decls in rules:
            if compact:
                out.append(selector + "{" + ";".join(x.replace(": ", ":") for x in decls) + "}")
            else:
                out.append(selector + " {\n" + "".join(f"{i}{x};\n" for x in decls) + "}\n")
        return ("\n".join(out) + "\n").encode()


class _Page:
    def __init__(self, style: _Style, title: str, css_name: str,
                 nav: list[tuple[str, str]], years: str, d: Draw) -> None:
        self.style, self.site_title, self.css_name, self.nav = style, title, css_name, nav
        self.years = years
        self.separator = d.choice((" &mdash; ", " | ", " - ", " &middot; "))
        self.owner = d.choice(("", " All rights reserved.", " Made with a text editor."))

    def render(self, heading: str | None, content: str, *,
               tagline: str | None = None) -> bytes:
        s, i = self.style, self.style.indent
        title = self.site_title if heading is None else heading
        if heading is None and tagline:
            full = _esc(self.site_title) + self.separator + _esc(tagline)
        elif heading is None:
            full = _esc(self.site_title)
        else:
            full = _esc(heading) + self.separator + _esc(self.site_title)
        head = [s.doctype, f"<html lang=\"{s.lang}\">", "<head>", f"{i}<meta charset=\"utf-8\">",
                f"{i}<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
                f"{i}<title>{full}</title>"]
        if s.description:
            head.append(f"{i}<meta name=\"description\" content=\"{_esc(title)}\">")
        head += [f"{i}<link rel=\"stylesheet\" href=\"/{self.css_name}\">", "</head>", "<body>"]
        links = " ".join(f"<a href=\"{href}\">{label}</a>" for href, label in self.nav)
        box, nav_tag, main_tag, foot = (("header", "nav", "main", "footer") if s.semantic else
                                        ("div id=\"header\"", "div id=\"nav\"",
                                         "div id=\"content\"", "div id=\"footer\""))
        body = [f"<{box}>", f"{i}<h1><a href=\"/\">{_esc(self.site_title)}</a></h1>",
                f"{i}<{nav_tag}>{links}</{nav_tag.split()[0]}>", f"</{box.split()[0]}>",
                f"<{main_tag}>"]
        if heading is not None:
            body.append(f"<h2>{_esc(heading)}</h2>")
        body.append(content.rstrip("\n"))
        body += [f"</{main_tag.split()[0]}>", f"<{foot}>",
                 f"{i}<p>&copy; {self.years} {_esc(self.site_title)}.{self.owner}</p>",
                 f"</{foot.split()[0]}>", "</body>", "</html>", ""]
        return "\n".join(head + body).encode()


def _article(title: str, mtime: int, paragraphs: list[str], style: _Style) -> str:
    date = _date(mtime, style)
    return f"<p class=\"meta\">{date}</p>\n" + "".join(f"<p>{_esc(p)}</p>\n" for p in paragraphs)


def _summary(name: str, title: str, mtime: int, first: str, style: _Style) -> str:
    return (f"<article>\n<h2><a href=\"/{name}\">{_esc(title)}</a></h2>\n"
            f"<p class=\"meta\">{_date(mtime, style)}</p>\n<p>{_esc(first)}</p>\n"
            f"<p><a href=\"/{name}\">Read more</a></p>\n</article>\n")


def _date(mtime: int, style: _Style) -> str:
    t = time.gmtime(mtime)
    month = _MONTHS[t.tm_mon - 1]
    return f"{t.tm_mday} {month} {t.tm_year}" if style.date_first else f"{month} {t.tm_year}"


def _slug(text: str) -> str:
    out = "".join(c.lower() if c.isalnum() else "-" for c in text)
    return "-".join(part for part in out.split("-") if part)


def _esc(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("\"", "&quot;").replace("'", "&#39;"))


def _hsl_hex(h: int, s: int, lightness: int) -> str:
    sf, lf = s / 100, lightness / 100
    c = (1 - abs(2 * lf - 1)) * sf
    x = c * (1 - abs((h / 60) % 2 - 1))
    m = lf - c / 2
    r, g, b = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][h // 60 % 6]
    return "#" + "".join(f"{round((v + m) * 255):02x}" for v in (r, g, b))


def _favicon(d: Draw) -> bytes:
    """A 16x16 or 32x32 32-bit icon: a coloured disc or square with a contrasting mark."""
    size = d.choice((16, 16, 32))
    fg = bytes.fromhex(_hsl_hex(d.below(360), d.between(40, 90), d.between(25, 55))[1:])
    mark = bytes.fromhex(_hsl_hex(d.below(360), d.between(0, 40), d.between(85, 100))[1:])
    disc = d.chance(50)
    stripe = d.below(3)  # 0: a dot, 1: a bar, 2: a diagonal
    half = size / 2
    rows = []
    mask_rows = []
    for y in range(size - 1, -1, -1):  # bottom-up, as BMP stores rows
        row = bytearray()
        mask = 0
        for x in range(size):
            dx, dy = x + 0.5 - half, y + 0.5 - half
            inside = dx * dx + dy * dy <= half * half if disc else True
            if stripe == 0:
                marked = dx * dx + dy * dy <= (size / 6) ** 2
            elif stripe == 1:
                marked = abs(dy) <= size / 10
            else:
                marked = abs(dx - dy) <= size / 8
            rgb = (mark if marked else fg) if inside else b"\0\0\0"
            row += bytes((rgb[2], rgb[1], rgb[0], 255 if inside else 0))
            mask = mask << 1 | (0 if inside else 1)
        rows.append(bytes(row))
        mask_rows.append(mask.to_bytes(size // 8, "big").ljust(4 * ((size + 31) // 32), b"\0"))
    pixels = b"".join(rows) + b"".join(mask_rows)
    info = struct.pack("<IiiHHIIiiII", 40, size, size * 2, 1, 32, 0, len(pixels), 0, 0, 0, 0)
    image = info + pixels
    entry = struct.pack("<BBBBHHII", size, size, 0, 0, 1, 32, len(image), 6 + 16)
    return struct.pack("<HHH", 0, 1, 1) + entry + image
