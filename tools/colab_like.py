"""Run every notebook the way a reader on Colab does: package installed by the setup cell, no checkout.

    python tools/colab_like.py [notebook.ipynb ...]     # default: every notebook under book/

1. A clean virtual environment gets what a Colab runtime already has (torch, Jupyter's kernel, pytest and
   nbval to check the result), then exactly the requirement string of the setup cell
   (``companion[colab] @ git+<repository>``) with the repository replaced by this checkout
   (``git+file://...``, i.e. what is committed). Versions are held to requirements.lock, so the run is
   repeatable; the set of packages is the setup cell's own.
2. The notebooks are copied to a folder outside the checkout, ``data/`` is served from a loopback HTTP
   server and ``COMPANION_DATA_URL`` points at it, so every data file arrives through the package's
   download-and-verify path into an empty cache.
3. nbval runs there, on a simulated foreign CPU when ``ATEN_CPU_CAPABILITY`` etc. are set (``make test`` does;
   the checkout's ``conftest.py``, copied there, refuses to run if torch did not take it). Afterwards the script checks that the package came
   from the environment (not the checkout) and that every data file the notebooks used was downloaded and
   matches the manifest.

Python: Colab runs 3.12, but the only CPU build of torch reachable offline here is a wheel for the Python
that made .venv (3.11); for 3.12 the registry serves the multi-GB CUDA build, which does not fit CI's budget.
The script uses the interpreter it runs under and says which in its log.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from notebooks import SETUP_CELL, notebooks  # noqa: E402

sys.path.insert(0, str(ROOT))
from companion._meta import REPOSITORY_URL  # noqa: E402

# What a Colab runtime has before the setup cell runs (torch, the Jupyter kernel), plus the checkers.
RUNTIME = ["torch", "ipykernel", "pytest", "nbval"]


def setup_requirement() -> str:
    """The requirement string the setup cell installs, pointed at this checkout."""
    found = re.findall(r'"([^"]+ @ git\+[^"]+)"', SETUP_CELL)
    if len(found) != 1:
        raise SystemExit(f"expected one 'name @ git+URL' requirement in the setup cell, found {found!r}")
    requirement = found[0]
    if not requirement.endswith(REPOSITORY_URL):
        raise SystemExit(f"the setup cell installs {requirement!r}, not from {REPOSITORY_URL}")
    return requirement.replace(REPOSITORY_URL, ROOT.as_uri())


def setup_nodeps() -> list[str]:
    """The requirements the setup cell installs with --no-deps (requirements-nodeps.txt)."""
    found = re.findall(r'"--no-deps", ((?:"[^"]+"(?:, )?)+)\]', SETUP_CELL)
    if len(found) != 1:
        raise SystemExit(f"expected one --no-deps install in the setup cell, found {found!r}")
    return re.findall(r'"([^"]+)"', found[0])


class _Handler(http.server.SimpleHTTPRequestHandler):
    served: list[str] = []

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass

    def do_GET(self):  # noqa: N802 - the base class's name
        type(self).served.append(self.path.lstrip("/"))
        super().do_GET()


def serve(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def run(cmd: list[str], **kwargs) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def main(argv: list[str]) -> int:
    selected = [Path(a).resolve() for a in argv] or notebooks()
    work = Path(tempfile.mkdtemp(prefix="colab-like-"))
    env_dir, book, cache = work / "venv", work / "book", work / "data-cache"
    print(f"Colab-like run in {work}: Python {sys.version.split()[0]} (Colab has 3.12; the offline CPU torch "
          f"wheel here is for this Python only, PyPI's 3.12 torch is the multi-GB CUDA build)", flush=True)
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    run([python, "-m", "pip", "install", "-q", "--upgrade", "pip"])  # ensurepip's pip rejects git+file:// URLs
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c", str(ROOT / "requirements.lock")]
    run([*pip, *RUNTIME])
    requirement = setup_requirement()
    print(f"setup cell installs: {requirement}", flush=True)
    run([*pip, requirement])
    run([*pip, "--no-deps", *setup_nodeps()])

    for path in selected:
        dest = book / path.relative_to(ROOT / "book")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
    shutil.copy2(ROOT / "book" / "nbval_sanitize.cfg", book / "nbval_sanitize.cfg")
    shutil.copy2(ROOT / "conftest.py", book / "conftest.py")  # its foreign-CPU guard and capability header
    (book / "pytest.ini").write_text("[pytest]\n")

    server, url = serve(ROOT / "data")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "COMPANION_"))}
    env.update(COMPANION_DATA_URL=url, COMPANION_DATA_DIR=str(cache), PATH=f"{env_dir / 'bin'}:{env['PATH']}")
    where = subprocess.run([python, "-c", "import companion, companion.data as d; print(companion.__file__); "
                            "print(d.checkout_data_dir())"], env=env, cwd=work, check=True, capture_output=True,
                           text=True).stdout.split("\n")
    if not where[0].startswith(str(env_dir)) or where[1] != "None":
        raise SystemExit(f"companion was not imported from the clean environment: {where}")
    print(f"companion imported from {where[0]}; data from {url} into {cache}", flush=True)
    try:
        tests = subprocess.run([python, "-m", "pytest", "--nbval", "--nbval-current-env", "-p", "no:cacheprovider",
                                "--nbval-sanitize-with", "nbval_sanitize.cfg", "-q", "--durations=0", "."],
                               cwd=book, env=env)
    finally:
        server.shutdown()
    downloaded = sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file())
    manifest = json.loads((ROOT / "data" / "manifest.json").read_text())
    manifest = manifest.get("files", manifest)
    bad = [n for n in downloaded if hashlib.sha256((cache / n).read_bytes()).hexdigest() != manifest[n]["sha256"]]
    unserved = sorted(set(downloaded) - set(_Handler.served))
    print(f"data files downloaded and verified: {len(downloaded)} ({', '.join(downloaded) or 'none'})")
    if bad or unserved:
        print(f"checksum mismatch: {bad}; in the cache but never served: {unserved}")
        return 1
    if not downloaded and tests.returncode == 0:
        print("no data file was downloaded: the download path was not exercised")
        return 1
    shutil.rmtree(work, ignore_errors=True)
    return tests.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
