"""Drives the dashboard at /ui in headless Chromium (Playwright on Debian's chromium) as a person
would: sees the key prompt, enters the key, registers a model and a dataset through the forms,
submits a job, watches its loss curve grow, checks the stage table, artifacts and the Pareto
chart, downloads report.json, and takes screenshots. Prints one JSON line of what it saw; the
Rust test (tests/worker/dashboard.rs) asserts on it.

Usage: python dashboard.py CONFIG.json, where the config names url, key, chromium, model_files,
dataset_file, spec (the job spec, model and dataset ids filled in by the page), second_job
(posted through the API, for the comparison) and screenshots (a folder).
"""

import hashlib
import json
import sys
import time
import urllib.request

from playwright.sync_api import sync_playwright

WAIT_MS = 240_000


def api(config, method, path, body=None):
    request = urllib.request.Request(
        config["url"] + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {config['key']}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def points(page, chart_id):
    value = page.get_attribute(f"#{chart_id} svg", "data-points")
    return int(value or 0)


def main():
    config = json.load(open(sys.argv[1]))
    shots = config["screenshots"]
    seen = {"console_errors": [], "loss_points_while_running": []}

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=config["chromium"], args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        page = browser.new_page(viewport={"width": 1360, "height": 900}, accept_downloads=True)
        page.on("console", lambda m: m.type == "error" and seen["console_errors"].append(m.text))
        page.on("pageerror", lambda e: seen["console_errors"].append(str(e)))
        page.set_default_timeout(30_000)

        # Without a key the API refuses, and the page says what to do.
        page.goto(config["url"] + "/ui")
        page.wait_for_selector("text=This server needs an API key")
        seen["asked_for_key"] = True
        # The refused calls log console errors of their own (401s); only later ones count.
        seen["console_errors"].clear()

        page.fill("#api-key", config["key"])
        page.click("#key-form button[type=submit]")
        page.wait_for_selector("#key-state.saved")
        page.wait_for_selector("#jobs tbody td.empty")

        # Register the model (several files) and the dataset through the upload forms.
        page.click("nav a[data-page=register]")
        page.fill("#model-upload input[name=name]", "tiny-bert")
        page.set_input_files("#model-upload input[name=file]", config["model_files"])
        page.click("#model-upload button[type=submit]")
        model_id = page.wait_for_selector("#model-upload .registered-id").inner_text()
        page.fill("#dataset-upload input[name=name]", "keywords")
        page.set_input_files("#dataset-upload input[name=file]", config["dataset_file"])
        page.click("#dataset-upload button[type=submit]")
        dataset_id = page.wait_for_selector("#dataset-upload .registered-id").inner_text()
        page.wait_for_selector(f"#model-list tr[data-model='{model_id}']")
        page.wait_for_selector(f"#dataset-list tr[data-dataset='{dataset_id}']")
        seen["registered"] = {"model": model_id, "dataset": dataset_id}
        page.screenshot(path=f"{shots}/register.png", full_page=True)

        # A spec that is refused shows the server's reason and field.
        page.click("nav a[data-page=new]")
        page.wait_for_selector(f"#job-model option[value='{model_id}']", state="attached")
        spec = dict(config["spec"], model=model_id)
        spec["task"] = dict(spec["task"], dataset=dataset_id)
        bad = json.loads(json.dumps(spec))
        bad["pipeline"][0]["epochs"] = 0
        page.fill("#job-spec", json.dumps(bad, indent=2))
        page.click("#job-form button[type=submit]")
        seen["refused_spec"] = page.wait_for_selector("#job-message .notice.error").inner_text()
        # The browser logs the refusal's 422 as a console error of its own; only that one is
        # expected, anything else still counts.
        expected = "status of 422"
        seen["console_errors"] = [e for e in seen["console_errors"] if expected not in e]

        # The real job: the page goes to the job's own view.
        page.fill("#job-spec", json.dumps(spec, indent=2))
        page.click("#job-form button[type=submit]")
        page.wait_for_url(lambda url: "#/jobs/" in url)
        job_id = page.url.rsplit("/", 1)[1]
        seen["job"] = job_id

        # The loss curve grows while the job runs: count the plotted points as events arrive.
        deadline = time.time() + WAIT_MS / 1000
        running_shot = False
        while time.time() < deadline:
            status = page.inner_text("#job-status")
            count = points(page, "loss-chart")
            if status == "running":
                counts = seen["loss_points_while_running"]
                if not counts or counts[-1] != count:
                    counts.append(count)
                if count >= 3 and not running_shot:
                    page.screenshot(path=f"{shots}/job-running.png", full_page=True)
                    running_shot = True
            if status in ("succeeded", "failed", "cancelled"):
                break
            page.wait_for_timeout(250)
        seen["status"] = page.inner_text("#job-status")
        page.wait_for_selector("#stage-table[data-source=report]", timeout=WAIT_MS)
        page.wait_for_selector("#artifact-table")
        seen["loss_points_final"] = points(page, "loss-chart")
        seen["lr_points_final"] = points(page, "lr-chart")
        seen["eval_points_final"] = points(page, "eval-chart")
        seen["stage_rows"] = page.eval_on_selector_all(
            "#stage-table tbody tr", "rows => rows.map(r => r.dataset.stage)"
        )
        seen["stage_table_text"] = page.inner_text("#stage-table")
        seen["artifacts"] = page.eval_on_selector_all(
            "#artifacts button[data-artifact]", "bs => bs.map(b => b.dataset.artifact)"
        )
        seen["progress_text"] = page.inner_text("#progress-text")

        # Downloads carry the key (fetched as a blob): the file's sha256 is the listed one.
        with page.expect_download() as download:
            page.click("#artifact-table button[data-artifact='report.json']")
        path = download.value.path()
        seen["downloaded_report_sha256"] = hashlib.sha256(open(path, "rb").read()).hexdigest()
        page.screenshot(path=f"{shots}/job.png", full_page=True)

        # A second, shorter job through the API gives the comparison another model to plot.
        second = api(config, "POST", "/v1/jobs", dict(config["second_job"], model=model_id, task=spec["task"]))
        while api(config, "GET", f"/v1/jobs/{second['id']}")["status"] not in ("succeeded", "failed", "cancelled"):
            if time.time() > deadline:
                raise SystemExit("the second job did not finish")
            time.sleep(0.5)
        seen["second_job"] = second["id"]

        # The jobs list: both jobs, the filters narrow it.
        page.click("nav a[data-page=jobs]")
        page.wait_for_selector(f"#jobs tr[data-job='{second['id']}']")
        seen["listed_jobs"] = page.eval_on_selector_all("#jobs tr[data-job]", "rs => rs.length")
        page.fill("#filter-name", spec["name"])
        seen["listed_after_search"] = page.eval_on_selector_all("#jobs tr[data-job]", "rs => rs.length")
        page.fill("#filter-name", "")
        page.select_option("#filter-status", "failed")
        page.wait_for_selector("#jobs td.empty")
        seen["listed_failed"] = page.eval_on_selector_all("#jobs tr[data-job]", "rs => rs.length")
        page.select_option("#filter-status", "")
        page.wait_for_selector(f"#jobs tr[data-job='{job_id}']")
        page.screenshot(path=f"{shots}/jobs.png", full_page=True)

        # Compare: tick both jobs and open the comparison.
        page.check(f"#jobs tr[data-job='{job_id}'] input[type=checkbox]")
        page.check(f"#jobs tr[data-job='{second['id']}'] input[type=checkbox]")
        page.click("#compare-selected")
        page.wait_for_selector("#pareto-size svg[data-points='4']")
        seen["pareto"] = {
            "size_points": points(page, "pareto-size"),
            "size_front": int(page.get_attribute("#pareto-size svg", "data-pareto")),
            "size_front_marked": page.eval_on_selector_all("#pareto-size circle.pareto", "cs => cs.length"),
            "latency_points": points(page, "pareto-latency"),
            "latency_front_marked": page.eval_on_selector_all("#pareto-latency circle.pareto", "cs => cs.length"),
        }
        page.screenshot(path=f"{shots}/compare.png", full_page=True)
        browser.close()

    print(json.dumps(seen))


if __name__ == "__main__":
    main()
