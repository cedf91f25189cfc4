"""Open HTML pages in headless Chromium and fail on console errors, exceptions or failed loads.

Usage: python .ci/check_report.py REPORT_DIR/index.html [more.html ...] [--screenshot out.png]
Every page linked from the first one (relative .html links) is checked as well.
"""

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import websocket

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-extensions", "--disable-dev-shm-usage",
         "--remote-debugging-port=0", "--window-size=1300,1000", "--remote-allow-origins=*"]


class DevTools:
    def __init__(self, url):
        self.ws = websocket.create_connection(url, timeout=30)
        self.n = 0
        self.events = []

    def call(self, method, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, event, timeout=30):
        end = time.time() + timeout
        while time.time() < end:
            if any(e.get("method") == event for e in self.events):
                return
            self.events.append(json.loads(self.ws.recv()))
        raise TimeoutError(event)


def problems(events):
    out = []
    for e in events:
        m, p = e.get("method"), e.get("params", {})
        if m == "Runtime.exceptionThrown":
            out.append("exception: " + json.dumps(p.get("exceptionDetails", {}))[:300])
        elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console.error: " + json.dumps(p.get("args", []))[:300])
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            out.append("log error: " + p["entry"].get("text", "") + " " + p["entry"].get("url", ""))
        elif m == "Network.loadingFailed":
            out.append("load failed: " + json.dumps(p)[:300])
    return out


def main(argv):
    shot = None
    if "--screenshot" in argv:
        i = argv.index("--screenshot")
        shot = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    pages = [os.path.abspath(p) for p in argv]
    first = pages[0]
    with open(first, encoding="utf-8") as f:
        for href in re.findall(r"href='([^':#]+\.html)'", f.read()):
            path = os.path.normpath(os.path.join(os.path.dirname(first), href))
            if path not in pages:
                pages.append(path)
    profile = tempfile.mkdtemp(prefix="chromium-check-")
    proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    failures = 0
    try:
        port_file = os.path.join(profile, "DevToolsActivePort")
        end = time.time() + 60
        while not (os.path.exists(port_file) and open(port_file).read().strip()):
            if time.time() > end or proc.poll() is not None:
                print("chromium did not start", file=sys.stderr)
                return 1
            time.sleep(0.1)
        port = int(open(port_file).read().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            target = [t for t in json.load(r) if t["type"] == "page"][0]
        dev = DevTools(target["webSocketDebuggerUrl"])
        for domain in ("Page", "Runtime", "Log", "Network"):
            dev.call(f"{domain}.enable")
        for i, page in enumerate(pages):
            if not os.path.isfile(page):
                print(f"FAIL {page}: missing", file=sys.stderr)
                failures += 1
                continue
            dev.events = []
            dev.call("Page.navigate", url="file://" + page)
            dev.wait_for("Page.loadEventFired")
            time.sleep(0.5)
            dev.call("Runtime.evaluate", expression="1")  # drain late events
            found = problems(dev.events)
            n_img = dev.call("Runtime.evaluate", expression="document.images.length")["result"].get("value")
            broken = dev.call("Runtime.evaluate", expression="Array.from(document.images).filter(i => !i.complete || "
                              "i.naturalWidth === 0).length")["result"].get("value")
            if broken:
                found.append(f"{broken} of {n_img} images did not load")
            print(("FAIL " if found else "ok   ") + os.path.relpath(page, os.path.dirname(first)) + f" ({n_img} images)")
            for p in found:
                print("     " + p)
            failures += bool(found)
            if shot and i == 0:
                data = dev.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
                with open(shot, "wb") as f:
                    f.write(base64.b64decode(data))
        dev.ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
