"""The upload page, driven in headless Chromium (Selenium): upload a radiograph, read the result."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from covidcxr.serve.app import ServeSettings, create_app
from covidcxr.serve.predictor import Predictor
from serve_fixtures import copy_run, running_server, split_images, tiny_run, write_text_as_png

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        pytest.skip(f"headless Chromium is not installed ({CHROMIUM}, {CHROMEDRIVER}; Debian: apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    run_dir = copy_run(tiny_run(tmp_path_factory), tmp_path_factory.mktemp("browser") / "run")
    predictor = Predictor.load(run_dir)
    with running_server(create_app(predictor, ServeSettings())) as url:
        yield url, predictor, run_dir


def _submit(browser, url: str, path: Path) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url + "/")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model-summary").text.startswith("Model "))
    browser.find_element(By.ID, "file").send_keys(str(path))
    browser.find_element(By.ID, "submit").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error"))
    return browser.find_element(By.TAG_NAME, "body").get_attribute("data-state")


def test_upload_and_read_the_result(browser, served) -> None:
    from selenium.webdriver.common.by import By

    url, predictor, run_dir = served
    image = Path(split_images(run_dir, "test")[0])
    assert _submit(browser, url, image) == "done"
    expected = predictor.predict_file(image, gradcam=False)
    shown = float(browser.find_element(By.ID, "probability").text)
    assert shown == pytest.approx(expected.probability, abs=5e-4)  # shown with 3 decimals
    assert browser.find_element(By.ID, "decision").text.lower() == expected.decision
    assert float(browser.find_element(By.ID, "threshold").text) == pytest.approx(predictor.run.threshold)
    assert "serve-tiny" in browser.find_element(By.ID, "model-summary").text
    items = browser.find_elements(By.CSS_SELECTOR, "#warnings li")
    assert items and all(item.text for item in items)
    # an abstain reason is shown once, in the abstention box, not again among the warnings
    assert not {li.get_attribute("data-code") for li in items} & {r.code for r in expected.abstain_reasons}
    for name in ("input", "lung_mask", "gradcam"):  # the overlays decoded and displayed
        width = browser.execute_script(f"return document.getElementById('overlay-{name}').naturalWidth")
        assert width >= 64, name
    # the tiny run was never audited: the abstention is the first thing shown, in words
    box = browser.find_element(By.ID, "abstain-box")
    assert box.is_displayed() and "ABSTAINED" in box.text and "never audited" in box.text
    assert [li.get_attribute("data-code") for li in box.find_elements(By.TAG_NAME, "li")] == [r.code for r in expected.abstain_reasons]
    assert box.value_of_css_property("background-color") == "rgba(176, 0, 32, 1)"  # white on red, not small orange text
    assert "not to be acted on" in browser.find_element(By.ID, "probability-note").text
    assert not browser.find_element(By.ID, "abstention-off").is_displayed()
    facts = browser.find_element(By.ID, "model-facts")
    assert facts.is_displayed() and "synthetic phantoms — demo only" in browser.find_element(By.ID, "card-trained-on").text
    assert "Every prediction of this model abstains" in browser.find_element(By.ID, "model-abstains").text
    assert len(browser.find_elements(By.CSS_SELECTOR, "#card-not-for li")) >= 3


def test_abstention_off_is_said_on_the_page(browser, served) -> None:
    from selenium.webdriver.common.by import By

    _, predictor, run_dir = served
    research = Predictor(predictor.run, out_of_distribution=False, abstain=False)
    with running_server(create_app(research, ServeSettings(gradcam=False))) as url:
        assert _submit(browser, url, Path(split_images(run_dir, "test")[0])) == "done"
        notice = browser.find_element(By.ID, "abstention-off")
        assert notice.is_displayed() and "research use only" in notice.text
        assert not browser.find_element(By.ID, "abstain-box").is_displayed()
        assert browser.find_element(By.ID, "decision").text in ("covid", "rest")
        assert "Abstention is OFF" in browser.find_element(By.ID, "model-abstains").text


def test_a_bad_upload_shows_the_refusal(browser, served, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    url, _, _ = served
    assert _submit(browser, url, write_text_as_png(tmp_path / "notes.png")) == "error"
    message = browser.find_element(By.ID, "error").text
    assert "415" in message and "unsupported_media_type" in message
    assert not browser.find_element(By.ID, "result").is_displayed()
