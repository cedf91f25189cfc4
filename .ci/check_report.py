"""Open HTML pages in headless Chromium and fail on console errors, exceptions or failed loads.

Usage: python .ci/check_report.py REPORT_DIR/index.html [more.html ...] [--screenshot out.png]
Every page linked from the first one (relative .html links) is checked as well.
"""

import base64
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from browser import chromium, problems  # noqa: E402


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
    failures = 0
    with chromium(window_size=(1300, 1000)) as dev:
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
            n_img = dev.js("document.images.length")
            broken = dev.js("Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).length")
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
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
