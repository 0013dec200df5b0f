"""The operator's console in a real headless Chromium against a real `calibserve serve` (auth on).

The tests run in file order on one browser and one server: the list, a model page and its diagram, a
rollback, a fit from a file and a refused upload, a read key, hostile names, a phone's screen. Each ends with
no error in the browser's console (beyond the failed request a test provokes on purpose). Screenshots go to
tests/artifacts/screenshots/.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from service import workflows
from service.core import metrics
from tests.helpers import browser
from tests.helpers.console import ADMIN_KEY, HOSTILE, READ_KEY
from tests.helpers.servers import Server

try:
    from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except (
    ImportError
):  # the dev extra is missing: the `console` fixture skips, or fails under CALIBSERVE_REQUIRE_ALL=1
    NoAlertPresentException = StaleElementReferenceException = By = Keys = WebDriverWait = None

WAIT_S = 30


def wait(driver, condition, what: str):
    # a page that is redrawn replaces elements: one found a moment ago may be gone, so look again
    waiting = WebDriverWait(driver, WAIT_S, ignored_exceptions=(StaleElementReferenceException,))
    return waiting.until(lambda d: condition(d), message=f"waiting for {what}")


def find(driver, css: str):
    return driver.find_element(By.CSS_SELECTOR, css)


def texts(driver, css: str) -> list[str]:
    return [element.text for element in driver.find_elements(By.CSS_SELECTOR, css)]


def use_key(driver, key: str) -> None:
    """Type the key and press Enter (the keyboard path), then wait for the role to show."""
    field = find(driver, "#key-input")
    field.clear()
    field.send_keys(key, Keys.ENTER)
    wait(driver, lambda d: find(d, "#key-state").text.startswith("Key role"), "the key's role")


def open_model(driver, name: str) -> None:
    find(driver, "a.brand").click()
    wait(driver, lambda d: d.find_elements(By.LINK_TEXT, name), f"the link to {name}")
    driver.find_element(By.LINK_TEXT, name).click()
    wait(
        driver,
        lambda d: d.find_elements(By.CSS_SELECTOR, "main[aria-busy=false] #h-actions"),
        f"{name}'s page",
    )


def no_console_errors(driver, allowed: tuple[str, ...] = ()) -> None:
    errors = [error for error in browser.console_errors(driver) if not any(part in error for part in allowed)]
    assert errors == []


def test_the_list_shows_every_model_after_the_key_is_entered(console, chromium):
    chromium.get(console.server.url + "/ui")
    wait(chromium, lambda d: "Enter an API key" in find(d, "main").text, "the key prompt")
    use_key(chromium, ADMIN_KEY)
    wait(chromium, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#models tbody tr")) == 3, "three models")
    rows = {
        row[0]: row
        for row in (line.split("\n")[0].split(" ") for line in texts(chromium, "#models tbody tr"))
    }
    assert set(rows) == {"cifar", "digits-mlp", "hostile"}
    cifar = find(chromium, "#models tbody tr:first-child").text
    assert "logits-only" in cifar and "v2" in cifar and "isotonic" in cifar
    assert "TorchScript" in find(chromium, "#models tbody tr:nth-child(2)").text
    wait(
        chromium,
        lambda d: "outcomes" in find(d, "#models tbody tr:first-child td.monitoring").text,
        "monitoring",
    )
    assert "600 outcomes" in find(chromium, "#models tbody tr:first-child td.monitoring").text

    find(chromium, "#search").send_keys("cif")
    wait(chromium, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#models tbody tr")) == 1, "the search")
    assert "q=cif" in chromium.current_url and ADMIN_KEY not in chromium.current_url
    find(chromium, "#search").send_keys(Keys.BACKSPACE * 3)
    wait(chromium, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#models tbody tr")) == 3, "the full list")
    browser.screenshot(chromium, "models")

    # the key lives in the page's memory: nothing was stored without the user asking
    assert chromium.execute_script("return window.localStorage.length") == 0
    no_console_errors(chromium)


def test_the_pages_are_sent_with_a_strict_content_security_policy(console):
    with console.api() as api:
        for path in ("/ui", "/ui/models/cifar"):
            response = api.get(path)
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
            policy = response.headers["content-security-policy"]
            assert (
                "script-src 'self'" in policy
                and "unsafe-inline" not in policy
                and "unsafe-eval" not in policy
            )
            assert "http" not in policy  # no third-party origin
            assert response.headers["x-content-type-options"] == "nosniff"
            # every asset the shell names is the service's own
            assert not re.search(r"(src|href)=\"(https?:)?//", response.text)
        script = api.get("/ui/static/console.js")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        assert "innerHTML" not in script.text and "insertAdjacentHTML" not in script.text


def stored_figure(driver, version: int, within: str = "#stored-diagram"):
    """The figure of a version's stored diagram (its fit data), once its image has loaded."""
    figure = wait(
        driver,
        lambda d: d.find_elements(
            By.CSS_SELECTOR, f'{within} figure.diagram.stored[data-version="{version}"]'
        ),
        f"version {version}'s stored diagram",
    )[0]
    image = figure.find_element(By.TAG_NAME, "img")
    wait(
        driver,
        lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image),
        "the stored diagram's image",
    )
    assert image.get_attribute("src").startswith("blob:")
    return figure


def fit_data_bins(console, version: int):
    """reliability_bins of cifar's fit data before and after version ``version``, computed here."""
    with console.api(READ_KEY) as api:
        document = api.get(f"/v1/models/cifar/calibrators/{version}").json()
    probabilities = workflows.load_calibrator(document).transform(console.fit_logits)
    before = metrics.reliability_bins(console.fit_logits, console.fit_labels, from_logits=True)
    return before, metrics.reliability_bins(probabilities, console.fit_labels)


def test_a_model_page_shows_the_selected_versions_diagram_on_its_fit_data_at_once(console, chromium):
    open_model(chromium, "cifar")
    assert find(chromium, "#diagram").text == ""  # no file was picked: the stored diagram needs none
    figure = stored_figure(chromium, 2)
    before, after = fit_data_bins(console, 2)
    assert float(figure.get_attribute("data-ece-after")) == pytest.approx(after.ece, rel=1e-9)
    assert float(figure.get_attribute("data-ece-before")) == pytest.approx(before.ece, rel=1e-9)
    assert "on its fit data (n = 2000)" in figure.find_element(By.TAG_NAME, "figcaption").text
    find(chromium, "#stored-diagram details summary").click()
    shown = {
        group: [
            int(cell.text)
            for cell in chromium.find_elements(By.CSS_SELECTOR, f'#stored-bins-v2 td[data-group="{group}"]')
        ]
        for group in ("uncalibrated", "calibrated")
    }
    assert shown == {"uncalibrated": before.counts.tolist(), "calibrated": after.counts.tolist()}
    # the image is the route's SVG: the CLI's figure, its legend the ECE of the fit data computed here
    figure.find_element(By.LINK_TEXT, "Download SVG").click()
    svg = browser.downloaded(chromium, "cifar-v2-fit-reliability.svg").decode()
    assert "Version 2 on its fit data (n = 2000, 15 equal-width bins)" in svg
    assert f"after calibration (ECE = {after.ece:.4f})" in svg
    assert f"before calibration (ECE = {before.ece:.4f})" in svg
    no_console_errors(chromium)


# WCAG 2.x contrast ratio of each element's text colour against the first opaque background behind it
CONTRAST = r"""
const parse = (c) => { const v = c.match(/[\d.]+/g).map(Number); return v.length > 3 ? v : [...v, 1]; };
const channel = (c) => { c /= 255; return c <= 0.04045 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4; };
const luminance = ([r, g, b]) => 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b);
const background = (node) => {
  for (; node; node = node.parentElement) {
    const colour = parse(getComputedStyle(node).backgroundColor);
    if (colour[3] > 0) return colour;
  }
  return [255, 255, 255, 1];
};
return arguments[0].map((selector) => {
  const node = document.querySelector(selector);
  if (!node) return [selector, null];
  const [a, b] = [luminance(parse(getComputedStyle(node).color)), luminance(background(node))];
  return [selector, (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05)];
});
"""


def test_text_and_buttons_have_wcag_aa_contrast(console, chromium):
    selectors = [
        "main h1",
        "main p",
        "main .hint",
        "main a",
        "#versions thead th",
        "#versions tbody td",
        ".badge",
        "main button:not(:disabled):not([aria-pressed=true]):not(.danger)",
        "main button.danger:not(:disabled)",
        "main button[aria-pressed=true]",
        "main button:disabled",
        ".brand",
        ".key-state",
        "figcaption",
    ]
    ratios = dict(chromium.execute_script(CONTRAST, selectors))
    assert all(ratio is not None for ratio in ratios.values()), ratios  # every selector found its element
    low = {selector: round(ratio, 2) for selector, ratio in ratios.items() if ratio < 4.5}
    assert low == {}


def test_a_model_page_draws_the_reliability_diagram_of_the_selected_version(console, chromium):
    open_model(chromium, "cifar")
    versions = [
        row.get_attribute("data-version")
        for row in chromium.find_elements(By.CSS_SELECTOR, "#versions tbody tr")
    ]
    assert versions == ["2", "1"]  # newest first
    assert "active" in find(chromium, '#versions tr[data-version="2"]').text
    assert find(chromium, "#fit-figures").text.startswith("figure before after")
    assert chromium.find_elements(
        By.CSS_SELECTOR, "#version-detail svg.chart rect"
    )  # the confidence histogram
    wait(
        chromium,
        lambda d: d.find_elements(By.CSS_SELECTOR, "svg.chart[aria-label^='ECE']"),
        "monitoring charts",
    )

    find(chromium, "#diagram-form-scores").send_keys(str(console.data))
    find(chromium, "#diagram-form button[type=submit]").click()
    figure = wait(
        chromium,
        lambda d: d.find_elements(By.CSS_SELECTOR, '#diagram figure.diagram[data-version="2"]'),
        "the diagram",
    )[0]
    image = figure.find_element(By.TAG_NAME, "img")
    wait(
        chromium,
        lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image),
        "the image",
    )
    assert image.get_attribute("src").startswith("blob:")

    # what the page received is the CLI's SVG figure of version 2 on these data: its bins, its ECE
    with console.api() as api:
        document = api.get("/v1/models/cifar/calibrators/2").json()
    probabilities = workflows.load_calibrator(document).transform(console.logits)
    after = metrics.reliability_bins(probabilities, console.labels)
    before = metrics.reliability_bins(console.logits, console.labels, from_logits=True)
    figure.find_element(By.LINK_TEXT, "Download SVG").click()  # the bytes the page shows, as a file
    svg = browser.downloaded(chromium, "cifar-v2-reliability.svg").decode()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    assert f"after calibration (ECE = {after.ece:.4f})" in svg
    assert f"before calibration (ECE = {before.ece:.4f})" in svg
    assert "n = 1000, 15 equal-width bins" in svg
    assert float(figure.get_attribute("data-ece-after")) == pytest.approx(after.ece, rel=1e-9)
    find(chromium, "#diagram details summary").click()
    shown = [
        int(cell.text)
        for cell in chromium.find_elements(By.CSS_SELECTOR, '#bins-v2 td[data-group="calibrated"]')
    ]
    assert shown == after.counts.tolist()
    browser.screenshot(chromium, "model")
    browser.screenshot_page(chromium, "model-page")  # docs/console.png is this one, scaled down
    no_console_errors(chromium)


def test_npy_scores_with_csv_labels_draw_the_same_diagram_as_the_npz(console, chromium):
    npz_ece = find(chromium, '#diagram figure.diagram[data-version="2"]').get_attribute("data-ece-after")
    find(chromium, "#diagram-form-scores").send_keys(
        str(console.logits_npy)
    )  # read in the page, sent as JSON
    find(chromium, "#diagram-form-labels").send_keys(str(console.labels_csv))
    find(chromium, "#diagram-form button[type=submit]").click()
    wait(
        chromium,
        lambda d: "lenet-test-labels.csv" in find(d, "#diagram figcaption").text,
        "the diagram of the .npy",
    )
    after = float(find(chromium, '#diagram figure.diagram[data-version="2"]').get_attribute("data-ece-after"))
    # float32 logits in the .npy against the .npz's float32 logits: the same numbers
    assert after == pytest.approx(float(npz_ece), rel=1e-9)
    no_console_errors(chromium)


def test_the_monitoring_charts_are_hourly_series_of_the_windows_figures(console, chromium):
    with console.api(READ_KEY) as api:
        hour = api.get("/v1/models/cifar/monitoring?window=1h").json()
    assert hour["figures"]["n"] == 600  # the outcomes were all posted a moment ago
    for chart in ("series-ece", "series-accuracy", "series-volume"):
        find(chromium, f"#{chart} details summary").click()
    newest = [
        cell.text for cell in chromium.find_elements(By.CSS_SELECTOR, "#series-ece tbody tr:first-child td")
    ]
    assert newest == ["1–0 h ago", f"{hour['figures']['ece']:#.3g}"]
    volume = [row.text.split() for row in chromium.find_elements(By.CSS_SELECTOR, "#series-volume tbody tr")]
    # outcomes posted with their logits are not predictions; the 200 rows calibrated are
    assert len(volume) == 24 and volume[0][-2:] == ["600", "200"]
    assert all(row[-2:] == ["0", "0"] for row in volume[1:])
    accuracy = find(chromium, "#series-accuracy tbody tr:first-child").text
    assert hour["label_free"]["predictions"] == 200
    assert f"{hour['figures']['accuracy']:#.3g}" in accuracy
    assert f"{hour['label_free']['expected_accuracy']:#.3g}" in accuracy
    chromium.execute_script("document.getElementById('h-monitoring').scrollIntoView()")
    browser.screenshot(chromium, "monitoring")
    no_console_errors(chromium)


def test_two_versions_side_by_side(console, chromium):
    table = find(chromium, "#compare-table").text
    assert "v2" in table and "v1" in table and "method isotonic temperature" in table
    # each version's stored diagram on its fit data, side by side, with no data loaded for them
    shown = [stored_figure(chromium, version, "#compare-stored") for version in (2, 1)]
    for figure, version in zip(shown, (2, 1), strict=True):
        _, after = fit_data_bins(console, version)
        assert float(figure.get_attribute("data-ece-after")) == pytest.approx(after.ece, rel=1e-9)
    assert shown[0].get_attribute("data-ece-after") != shown[1].get_attribute("data-ece-after")
    chromium.find_element(By.XPATH, "//button[text()='Draw both diagrams']").click()
    wait(
        chromium,
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#compare-diagrams figure.diagram img")) == 2,
        "two diagrams",
    )
    versions = [
        f.get_attribute("data-version")
        for f in chromium.find_elements(By.CSS_SELECTOR, "#compare-diagrams figure")
    ]
    assert versions == ["2", "1"]
    no_console_errors(chromium)


def test_activating_an_older_version_is_a_rollback_the_api_answers_with(console, chromium):
    button = chromium.find_element(By.XPATH, "//tr[@data-version='1']//button[text()='Activate']")
    button.send_keys(Keys.ENTER)  # the keyboard path: the dialog opens with Cancel focused
    wait(chromium, lambda d: find(d, "#confirm").get_attribute("open") is not None, "the confirmation")
    assert chromium.switch_to.active_element.get_attribute("id") == "confirm-cancel"
    chromium.switch_to.active_element.send_keys(Keys.TAB)
    chromium.switch_to.active_element.send_keys(Keys.ENTER)
    wait(chromium, lambda d: "Version 1 of cifar is active" in find(d, "#notice").text, "the rollback")
    assert "active" in find(chromium, '#versions tr[data-version="1"]').text
    with console.api(READ_KEY) as api:
        assert api.get("/v1/models/cifar").json()["active_calibrator"]["version"] == 1
        answer = api.post("/v1/models/cifar/calibrate", json={"logits": console.logits[:3].tolist()})
        assert answer.status_code == 200 and answer.json()["calibrator_version"] == 1
    no_console_errors(chromium)


def test_a_fit_from_an_uploaded_file_becomes_the_active_version(console, chromium):
    find(chromium, "#fit-form-scores").send_keys(str(console.data))
    find(chromium, "#fit-form-method option[value='temperature']").click()
    find(chromium, "#fit-form button[type=submit]").click()
    wait(chromium, lambda d: find(d, "#confirm").get_attribute("open") is not None, "the confirmation")
    find(chromium, "#confirm-ok").click()
    wait(chromium, lambda d: "Fitted version 3" in find(d, "#notice").text, "the fit")
    with console.api() as api:
        listing = api.get("/v1/models/cifar/calibrators").json()
        assert listing["active_version"] == 3 and listing["items"][0]["fit"]["n"] == 1000
    # the data fitted on stays in the page: the new version's diagram is drawn at once
    wait(
        chromium,
        lambda d: d.find_elements(By.CSS_SELECTOR, '#diagram figure.diagram[data-version="3"] img'),
        "v3's diagram",
    )
    # and its stored diagram is that of the 1000 rows it was fitted on
    figure = stored_figure(chromium, 3)
    assert "on its fit data (n = 1000)" in figure.find_element(By.TAG_NAME, "figcaption").text
    no_console_errors(chromium)


def test_a_refused_action_shows_the_services_own_message(console, chromium):
    find(chromium, "#upload-file").send_keys(str(console.bad_document))
    chromium.find_element(By.XPATH, "//div[@id='upload-form']//button[text()='Upload']").click()
    wait(chromium, lambda d: find(d, "#confirm").get_attribute("open") is not None, "the confirmation")
    find(chromium, "#confirm-ok").click()
    wait(chromium, lambda d: find(d, "#error").is_displayed(), "the error")
    with console.api() as api:
        refused = api.post(
            "/v1/models/cifar/calibrators?activate=true",
            content=console.bad_document.read_bytes(),
            headers={"Content-Type": "application/json"},
        )
    assert refused.status_code == 400 and refused.json()["detail"]
    assert find(chromium, "#error").text == refused.json()["detail"]
    no_console_errors(chromium, allowed=("status of 400",))


def test_an_uploaded_document_becomes_a_version_and_an_inactive_version_is_deleted(
    console, chromium, tmp_path
):
    with console.api() as api:
        document = api.get("/v1/models/cifar/calibrators/1").content
    path = tmp_path / "cifar-v1.json"
    path.write_bytes(document)
    find(chromium, "#upload-file").send_keys(str(path))
    find(chromium, "#upload-activate").click()  # upload without activating
    chromium.find_element(By.XPATH, "//div[@id='upload-form']//button[text()='Upload']").click()
    wait(chromium, lambda d: find(d, "#confirm").get_attribute("open") is not None, "the confirmation")
    find(chromium, "#confirm-ok").click()
    wait(chromium, lambda d: "Uploaded as version 4" in find(d, "#notice").text, "the upload")
    with console.api() as api:
        listing = api.get("/v1/models/cifar/calibrators").json()
    assert [item["version"] for item in listing["items"]] == [4, 3, 2, 1] and listing["active_version"] == 3

    chromium.find_element(By.XPATH, "//tr[@data-version='4']//button[text()='Delete']").click()
    wait(chromium, lambda d: find(d, "#confirm").get_attribute("open") is not None, "the confirmation")
    find(chromium, "#confirm-cancel").click()  # cancelled: nothing happens
    with console.api() as api:
        assert api.get("/v1/models/cifar/calibrators/4").status_code == 200
    chromium.find_element(By.XPATH, "//tr[@data-version='4']//button[text()='Delete']").click()
    wait(chromium, lambda d: find(d, "#confirm").get_attribute("open") is not None, "the confirmation")
    find(chromium, "#confirm-ok").click()
    wait(chromium, lambda d: "Version 4 of cifar was deleted" in find(d, "#notice").text, "the deletion")
    with console.api() as api:
        assert api.get("/v1/models/cifar/calibrators/4").status_code == 404
    active = chromium.find_element(By.XPATH, "//tr[@data-version='3']//button[text()='Delete']")
    assert not active.is_enabled() and "active version cannot be deleted" in active.get_attribute("title")
    no_console_errors(chromium)


def test_every_form_control_has_a_label(console, chromium):
    unlabelled = chromium.execute_script(
        """
        return [...document.querySelectorAll("input, select, textarea")]
          .filter((c) => c.type !== "hidden" && c.labels.length === 0 && !c.getAttribute("aria-label"))
          .map((c) => c.id || c.outerHTML.slice(0, 80));
        """
    )
    assert unlabelled == []
    assert chromium.find_elements(By.CSS_SELECTOR, "#versions th[scope=col]")  # header cells are marked


def test_a_read_key_sees_everything_and_every_change_is_disabled_with_the_reason(console, chromium):
    find(chromium, "#key-forget").click()
    use_key(chromium, READ_KEY)
    assert find(chromium, "#key-state").text == "Key role: read"
    open_model(chromium, "cifar")
    assert len(chromium.find_elements(By.CSS_SELECTOR, "#versions tbody tr")) == 3
    reason = find(chromium, "#why-disabled").text
    assert "read role" in reason
    buttons = chromium.find_elements(
        By.XPATH, "//main//button[text()='Activate' or text()='Delete' or text()='Upload' or text()='Fit']"
    )
    assert len(buttons) == 3 * 2 + 2
    for button in buttons:
        assert not button.is_enabled()
        assert button.get_attribute("title") == reason
        assert button.get_attribute("aria-describedby") == "why-disabled"
    assert find(chromium, "#fit-figures")  # the read key sees the figures
    browser.screenshot(chromium, "model-read-key")
    no_console_errors(chromium)


def test_hostile_class_names_and_model_names_render_as_text(console, chromium):
    open_model(chromium, "hostile")
    facts = find(chromium, "dl.facts").text
    assert HOSTILE in facts and "<script>alert(2)</script>" in facts and "<b>bold</b>" in facts
    assert chromium.find_elements(By.CSS_SELECTOR, "main img, main script, main b") == []
    chromium.get(console.server.url + "/ui/models/%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E")
    use_key(chromium, READ_KEY)
    wait(chromium, lambda d: find(d, "#error").is_displayed(), "the refusal")
    assert find(chromium, "main h1").text == HOSTILE
    assert HOSTILE in find(chromium, "#error").text
    assert chromium.find_elements(By.CSS_SELECTOR, "main img, #error img") == []
    with pytest.raises(NoAlertPresentException):
        chromium.switch_to.alert.text  # noqa: B018
    no_console_errors(chromium)


def test_the_model_page_fits_a_phone_screen(console, chromium):
    chromium.set_window_size(*browser.PHONE)
    try:
        open_model(chromium, "cifar")
        wait(chromium, lambda d: d.find_elements(By.CSS_SELECTOR, "svg.chart"), "the charts")
        overflow = chromium.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 1  # wide tables scroll in their own box, the page does not
        browser.screenshot(chromium, "model-phone")
    finally:
        chromium.set_window_size(*browser.LAPTOP)
    no_console_errors(chromium)


def test_the_diagram_route_answers_svg_and_problems_like_evaluate(console):
    with console.api(READ_KEY) as api:
        body = {"logits": console.logits[:200].tolist(), "labels": console.labels[:200].tolist()}
        answer = api.post(
            "/v1/models/cifar/evaluate/diagram?version=1", json=body, headers={"Accept": "image/svg+xml"}
        )
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/svg+xml"
        report = api.post("/v1/models/cifar/evaluate?version=1", json=body).json()
        assert f"after calibration (ECE = {report['calibrated']['ece']:.4f})" in answer.text
        npz = api.post(
            "/v1/models/cifar/evaluate/diagram?version=1",
            content=console.data.read_bytes(),
            headers={"Content-Type": "application/x-npz"},
        )
        assert npz.status_code == 200 and "n = 1000" in npz.text
        wrong = {"logits": [[1.0, 2.0]], "labels": [0]}  # 2 columns for a 10-class model
        bad = api.post("/v1/models/cifar/evaluate/diagram", json=wrong)
        assert bad.status_code == 400 and bad.headers["content-type"] == "application/problem+json"
        assert bad.json() == api.post("/v1/models/cifar/evaluate", json=wrong).json()
    assert np.isfinite(report["calibrated"]["ece"])


def test_a_version_without_stored_bins_falls_back_to_the_file_picker(console, chromium):
    """A document fitted before the bins were stored (here: one uploaded without them) still shows its page:
    a note where the stored diagram would be, and the labelled-set form draws its diagram."""
    with console.api() as api:
        document = api.get("/v1/models/cifar/calibrators/1").json()
        old = {key: value for key, value in document.items() if key not in ("model", "version")}
        old["fit"] = {key: value for key, value in document["fit"].items() if key != "reliability"}
        assert api.put("/v1/models/legacy", json={"num_classes": 10}).status_code == 201
        assert api.post("/v1/models/legacy/calibrators", json=old).status_code == 201
    try:
        open_model(chromium, "legacy")
        note = wait(chromium, lambda d: d.find_elements(By.CSS_SELECTOR, ".no-stored-diagram"), "the note")
        assert "stores no reliability bins" in note[0].text
        assert chromium.find_elements(By.CSS_SELECTOR, "figure.diagram") == []
        assert find(chromium, "#fit-figures")  # the rest of the page is there
        find(chromium, "#diagram-form-scores").send_keys(str(console.data))
        find(chromium, "#diagram-form button[type=submit]").click()
        wait(
            chromium,
            lambda d: d.find_elements(By.CSS_SELECTOR, '#diagram figure.diagram[data-version="1"] img'),
            "the diagram on the file",
        )
        no_console_errors(chromium)
    finally:
        with console.api() as api:
            assert api.delete("/v1/models/legacy").status_code == 204


def test_with_auth_off_no_key_is_asked_and_the_list_pages(console, chromium, tmp_path):
    """Auth off (localhost, no keys), as the API: the pages need no key, every action is enabled; 45 models
    page by 20."""
    with Server(tmp_path / "store") as server:
        with server.client() as api:
            for i in range(45):
                assert api.put(f"/v1/models/m{i:02d}", json={"num_classes": 3}).status_code == 201
        chromium.get(server.url + "/ui")
        wait(
            chromium,
            lambda d: d.find_elements(By.CSS_SELECTOR, "main[aria-busy=false] #models tbody tr"),
            "the list",
        )
        assert find(chromium, "#key-state").text == "Auth is off: no key needed"
        assert find(chromium, ".count").text == "46 of 46 models"  # and the shipped digits-mlp
        first = texts(chromium, "#models tbody th")
        assert len(first) == 20 and first[0] == "digits-mlp"
        chromium.find_element(By.XPATH, "//button[text()='Next page']").click()
        wait(chromium, lambda d: texts(d, "#models tbody th")[0] == "m19", "page 2")
        assert "Page 2 of 3" in find(chromium, ".pager").text and "page=2" in chromium.current_url
        chromium.find_element(By.LINK_TEXT, "m30").click()
        wait(
            chromium,
            lambda d: d.find_elements(By.CSS_SELECTOR, "main[aria-busy=false] #h-actions"),
            "m30's page",
        )
        assert chromium.find_elements(By.ID, "why-disabled") == []
        assert find(chromium, "#fit-form button[type=submit]").is_enabled()
        chromium.back()
        wait(chromium, lambda d: d.find_elements(By.CSS_SELECTOR, "#models"), "the list again")
    no_console_errors(chromium)
