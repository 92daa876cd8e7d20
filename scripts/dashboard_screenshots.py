"""The screenshots of docs/dashboard.md: ``mlxfun serve`` on the shipped chat model, driven in
headless Chromium by Playwright (``pip install playwright``; the system Chromium, as in
``tox -e ui``).

    python scripts/dashboard_screenshots.py [--model demo/chat-model] [--out docs/images]

Collects statistics on the harmless calibration prompts into a temporary workdir, starts the
server there, loads the file, selects 8 experts model-wide, chats, masks the busiest expert of
the first MoE layer and asks again with steered and unsteered answers side by side.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "demo" / "chat-model")
    parser.add_argument(
        "--data", type=Path, default=ROOT / "demo" / "data" / "harmless_calib.jsonl"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp(prefix="dash-shots-"))
    mlxfun = [sys.executable, "-m", "mlxfun.cli"]
    collect = ["collect", "--model", str(args.model), "--dataset", str(args.data)]
    collect += ["--max-samples", "64", "-o", str(work / "harmless.npz")]
    subprocess.run([*mlxfun, *collect], check=True)
    port = free_port()
    server = subprocess.Popen(
        [*mlxfun, "serve", "--model", str(args.model), "--port", str(port), "--workdir", str(work)]
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                time.sleep(0.3)
        args.out.mkdir(parents=True, exist_ok=True)
        env_preload = os.environ.pop("LD_PRELOAD", None)  # Playwright's driver dies with it
        with sync_playwright() as p:
            chromium = shutil.which("chromium") or shutil.which("chromium-browser")
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(url + "/")
            page.wait_for_selector("#heatmap rect.cell")
            page.select_option("#source", "harmless.npz")
            page.wait_for_function(
                "document.querySelector('#legend').textContent.includes('tokens')"
            )
            page.check('input[name="mode"][value="model_wide"]')
            page.fill("#select-n", "8")
            page.click("#select")
            page.wait_for_selector("#heatmap rect.cell.selected")
            page.screenshot(path=str(args.out / "dashboard-model-wide.png"), full_page=True)
            page.click('nav button[data-tab="chat"]')
            page.fill("#chat-input", "Please, teach me to convert Celsius to Fahrenheit.")
            page.fill("#chat-max", "48")
            page.click("#chat-send")
            page.wait_for_selector(".answer[data-kind]")
            stats = json.loads(urllib.request.urlopen(url + "/v1/mlxfun/stats").read())
            info = json.loads(urllib.request.urlopen(url + "/v1/mlxfun/info").read())
            first = stats["scores"]["frequency"][0]
            for busiest in sorted(range(len(first)), key=lambda e: -first[e])[:4]:
                page.select_option("#steer-layer", str(info["layers"][0]))
                page.fill("#steer-expert", str(busiest))
                page.click("#steer-add")
            page.check("#chat-compare")
            page.locator(".answer[data-kind]").evaluate_all("els => els.forEach(e => e.remove())")
            page.click("#chat-send")
            page.wait_for_selector('.answer[data-kind="unsteered"]', timeout=120000)
            page.screenshot(path=str(args.out / "dashboard-steering.png"), full_page=True)
            browser.close()
        if env_preload is not None:
            os.environ["LD_PRELOAD"] = env_preload
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out}/dashboard-model-wide.png, dashboard-steering.png")


if __name__ == "__main__":
    main()
