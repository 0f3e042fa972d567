"""The screenshot in docs/web.md and the README: the chat page answering in headless Chromium, asked through its
form as a visitor asks.

    python tools/web_screenshot.py --onnx export/aira-tiny/fp32 --output docs/images/web-chat.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from aira_opt.folders import ExportFolder
from aira_opt.web.browser import headless_chromium, open_page, screenshot
from aira_opt.web.layout import web_models
from aira_opt.web.packages import ensure_packages
from aira_opt.web.server import WebApp, WebServer

QUESTIONS = ("What is the capital of Brazil?", "What is the capital of France?")  # one per model, in turn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", action="append", required=True, type=Path)
    parser.add_argument("--output", type=Path, default=Path("docs/images/web-chat.png"))
    args = parser.parse_args()
    app = WebApp(web_models([ExportFolder(f) for f in args.onnx]), ensure_packages(), threads=2)
    with WebServer(app) as server, headless_chromium() as browser, open_page(browser, server.url) as page:
        for i, name in enumerate(app.models):
            page.page.select_option("#model", name)
            question = QUESTIONS[i % len(QUESTIONS)]
            print(name, question, "->", page.type_and_send(question))
        assert page.off_loopback() == [], page.off_loopback()
        print("wrote", screenshot(page, args.output))


if __name__ == "__main__":
    main()
