"""The web console in headless Chromium, against uvicorn in its own process; screenshots saved.

Needs Debian's `chromium` (`scripts/install-chromium.sh`); skipped without it unless
FEDPACT_REQUIRE_BROWSER=1. Chromium is driven over the DevTools protocol with the `websockets`
package uvicorn already brings (no Playwright: its browser download does not work here).
Screenshots go to $FEDPACT_SCREENSHOT_DIR when set, else to the test's temporary folder.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpact.federation.coordinator import JobResult, PartnerSummary, partner_datasets
from fedpact.federation.job import JobConfig
from fedpact.models.metrics import metrics_from_histograms, score_histogram
from fedpact.models.networks import build_model
from fedpact.service.api.app import CoordinatorService
from fedpact.service.api.auth import totp
from fedpact.service.api.loadgen import serve_in_subprocess
from fedpact.service.api.schemas import JobRequestIn
from fedpact.service.api.testing import PASSWORD, seed_consortium

TELCO = partner_datasets(JobConfig(dataset="telco", partitioning="segment", num_partitions=3))


def chromium_binary() -> str | None:
    """Chromium on PATH, else whatever the project's own install script provides (apt as root)."""
    for name in (os.environ.get("FEDPACT_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    script = Path(__file__).resolve().parent.parent / "scripts" / "install-chromium.sh"
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900)
    path = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 and proc.stdout.strip() else ""
    return path if path and Path(path).exists() else None


class Browser:
    """Just enough of the DevTools protocol: navigate, run a script, wait, screenshot."""

    def __init__(self, binary: str, profile: Path):
        from websockets.sync.client import connect

        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-dev-shm-usage", "--remote-debugging-port=0", f"--user-data-dir={profile}",
             "--window-size=1280,1100", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("chromium did not start its DevTools endpoint")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        import httpx

        for _ in range(50):
            pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page"]
            if pages:
                break
            time.sleep(0.1)
        self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
        self.ids = itertools.count(1)
        self.call("Page.enable")

    def call(self, method: str, **params):
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv(timeout=30))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, predicate: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.js(f"document.readyState === 'complete' && !!({predicate})"):
                    return
            except RuntimeError:
                pass  # the page is being replaced
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {predicate!r} on {self.js('location.href')}")

    def open(self, url: str, predicate: str = "true") -> None:
        self.call("Page.navigate", url=url)
        self.wait(f"location.href.startsWith({json.dumps(url.split('?')[0])}) && ({predicate})")

    def text(self) -> str:
        return self.js("document.body.innerText")

    def screenshot(self, path: Path) -> Path:
        height = self.js("Math.min(document.documentElement.scrollHeight, 4000)")
        self.call("Emulation.setDeviceMetricsOverride", width=1280, height=int(height), deviceScaleFactor=1,
                  mobile=False)
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        self.call("Emulation.clearDeviceMetricsOverride")
        return path

    def sign_in(self, base: str, username: str, secret: str) -> None:
        self.open(f"{base}/console/login", "document.querySelector('#login')")
        self.js(f"""(() => {{
            const f = document.querySelector('#login');
            f.username.value = {json.dumps(username)};
            f.password.value = {json.dumps(PASSWORD)};
            f.code.value = {json.dumps(totp(secret, time.time()))};
            f.querySelector('button').click();
        }})()""")
        self.wait("location.pathname === '/console/jobs'")

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def registered_model(service: CoordinatorService, home: Path) -> str:
    """A model in the registry made from synthetic pooled histograms (no Flower run needed here)."""
    rng = np.random.default_rng(0)
    y = (rng.random(3000) < 0.27).astype(float)
    pos, neg, sq = score_histogram(y, 1 / (1 + np.exp(-(rng.normal(-1.3, 1.0, 3000) + 1.6 * y))))
    job = JobConfig(dataset="telco", rounds=2, home=str(home), purpose="churn_model_training")
    job.job_dir.mkdir(parents=True)
    layout = {"categorical": {"Contract": ["Month-to-month", "One year", "Two year"]}, "numeric": ["tenure"],
              "bounds": {"tenure": [0.0, 72.0]}}
    torch.save({"state_dict": build_model("logreg", 4).state_dict(), "model": "logreg", "layout": layout},
               job.job_dir / "model.pt")
    final = {"round": 2, **metrics_from_histograms(pos, neg, sq), "epsilon": 0.8}
    partners = [PartnerSummary(p, 1500, 400, 0.8, 1.2, 0.3, 8, 0.81, 0.74, 0.51) for p in TELCO]
    result = JobResult(job.job_id, job.as_dict(), partners, [final], final, 0.8, 1e-5, 9, 1.0,
                       str(job.job_dir / "model.pt"), layout, 0.51)
    result.histograms = {"pos": pos.tolist(), "neg": neg.tolist(), "sq_error": sq}
    version = service.registry.register(job, result, name="churn-telco", requested_by="dana", partners=TELCO)
    return f"churn-telco@{version}"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    binary = chromium_binary()
    if binary is None:
        reason = "no chromium: run scripts/install-chromium.sh"
        if os.environ.get("FEDPACT_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + " (FEDPACT_REQUIRE_BROWSER=1)", pytrace=False)
        pytest.skip(reason)
    home = tmp_path_factory.mktemp("browser-home")
    service = CoordinatorService(home, start_worker=False)
    people = seed_consortium(service, TELCO)
    principal = service.accounts.authenticate_token(people.scientist.token)
    job = service.board.submit(principal, JobRequestIn(dataset="telco", purpose="churn_model_training",
                                                       rounds=2), home=str(home))
    model = registered_model(service, home)
    service.close()
    shots = Path(os.environ.get("FEDPACT_SCREENSHOT_DIR") or tmp_path_factory.mktemp("screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    with serve_in_subprocess(home) as base:
        yield base, binary, people, job.job_id, model, shots, tmp_path_factory


@pytest.fixture()
def browser(site, tmp_path):
    _base, binary, *_ = site
    b = Browser(binary, tmp_path / "profile")
    yield b
    b.close()


def looks_like_a_page(png: Path) -> None:
    from matplotlib.image import imread

    pixels = imread(png)
    assert pixels.shape[1] == 1280 and pixels.shape[0] >= 600
    assert len(np.unique(pixels.reshape(-1, pixels.shape[2])[::97], axis=0)) > 20  # not a blank page


def test_partner_admin_signs_in_and_approves_in_the_browser(site, browser):
    base, _bin, people, jid, _model, shots, _ = site
    admin = people.admins[TELCO[0]]
    browser.sign_in(base, admin.username, admin.totp_secret)
    looks_like_a_page(browser.screenshot(shots / "01-jobs.png"))
    assert jid in browser.text()
    browser.open(f"{base}/console/jobs/{jid}", "document.querySelector('#decisions')")
    looks_like_a_page(browser.screenshot(shots / "02-job-pending.png"))
    browser.js("document.querySelector('button.approve').click()")
    browser.wait(f"document.querySelector('tr[data-partner=\"{TELCO[0]}\"] .status.approved')")
    looks_like_a_page(browser.screenshot(shots / "03-job-approved.png"))
    assert "Revoke approval" in browser.text()


def test_compliance_officer_verifies_the_chain_and_reads_budgets(site, browser):
    base, _bin, people, jid, _model, shots, _ = site
    browser.sign_in(base, people.compliance.username, people.compliance.totp_secret)
    browser.open(f"{base}/console/audit?verify=1", "document.querySelector('#verification')")
    assert "chain verified" in browser.text()
    looks_like_a_page(browser.screenshot(shots / "04-audit-verified.png"))
    browser.open(f"{base}/console/audit?job_id={jid}", "document.querySelector('#events')")
    assert "job.requested" in browser.text()
    browser.open(f"{base}/console/budgets", "document.querySelector('#budgets')")
    looks_like_a_page(browser.screenshot(shots / "05-budgets.png"))


def test_data_scientist_sees_the_model_card_with_its_plots(site, browser):
    base, _bin, people, _jid, model, shots, _ = site
    browser.sign_in(base, people.scientist.username, people.scientist.totp_secret)
    browser.open(f"{base}/console/models/{model}",
                 "[...document.querySelectorAll('.plots img')].every(i => i.complete && i.naturalWidth > 300)")
    assert browser.js("document.querySelectorAll('.plots img').length") == 3
    assert "Model card: churn-telco@1" in browser.text()
    looks_like_a_page(browser.screenshot(shots / "06-model-card.png"))


def test_a_stale_session_cookie_sends_the_browser_to_sign_in(site, browser):
    base, *_ = site
    browser.call("Network.enable")
    browser.call("Network.setCookie", name="fedpact_session", value="stale", url=f"{base}/console/")
    browser.call("Page.navigate", url=f"{base}/console/jobs")
    browser.wait("location.pathname === '/console/login'")
    assert "15 minutes" in browser.text()
