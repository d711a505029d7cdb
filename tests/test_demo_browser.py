"""The demo in a real headless Chromium driven by selenium: open the page, upload an image, click Upscale, wait for
the SR image, save a screenshot (to $DIFFSR_SCREENSHOT, default a temporary file; `make screenshot` sets assets/demo.png).

Needs Debian's `chromium` and `chromium-driver` and the `selenium` package. When they are missing the test is SKIPPED
with the reason and the install command (a learner's machine may have no browser), except under CI=true or
DIFFSR_REQUIRE_BROWSER=1, where it FAILS, so CI cannot skip it silently."""
import os, shutil, tempfile
from pathlib import Path

os.environ['GRADIO_ANALYTICS_ENABLED'] = 'False'

import numpy as np
import pytest
from PIL import Image

WAIT = 120  # seconds: upper bound on each wait (page load, upload, one request) on a loaded 2-core machine
DRIVER = '/usr/bin/chromedriver'
INSTALL = ("install them with `sudo apt-get update && sudo apt-get install -y chromium chromium-driver` (Debian/Ubuntu) "
           "and `pip install selenium` (the dev extra)")

def browser_required() -> bool:
    "True under CI (CI=true, as CI services set it) or DIFFSR_REQUIRE_BROWSER=1: a missing browser fails instead of skipping."
    return os.environ.get('CI', '').lower() in ('1', 'true', 'yes') or os.environ.get('DIFFSR_REQUIRE_BROWSER') == '1'


def _chromium() -> str | None:
    for name in ('chromium', 'chromium-browser', 'google-chrome'):
        if (p := shutil.which(name)): return p
    return None

def _need_browser():
    "Skip (fail under CI or DIFFSR_REQUIRE_BROWSER=1) with the install command when a piece is missing."
    missing = []
    if _chromium() is None: missing.append('chromium')
    if not Path(DRIVER).exists(): missing.append(DRIVER + ' (chromium-driver)')
    try: import selenium  # noqa: F401
    except ImportError: missing.append('the selenium package')
    if not missing: return
    why = f"Browser test needs {', '.join(missing)}: {INSTALL}."
    if browser_required(): pytest.fail(why + ' (required here: CI=true or DIFFSR_REQUIRE_BROWSER=1)', pytrace=False)
    pytest.skip(why + ' (skipped: not under CI; set DIFFSR_REQUIRE_BROWSER=1 to make it fail)')

def chrome_driver(window: str = '1400,1200'):
    "A headless Chromium under selenium with the flags these machines need (no sandbox, no background network)."
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = _chromium()
    for a in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
              '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-dev-shm-usage',
              f'--window-size={window}', f'--user-data-dir={tempfile.mkdtemp(prefix="diffsr_chromium_")}'):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(WAIT)
    driver.set_script_timeout(WAIT)
    return driver

def test_demo_in_headless_chromium(tmp_path):
    _need_browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait
    from diffsr_kit.data import load_image
    from diffsr_kit.demo import default_model, free_port, launch_demo, make_demo, models_available

    photo = tmp_path / 'chelsea_upload.png'  # a real photograph, 300x451 -> cropped 300x448 -> LR 75x112 at x4
    Image.fromarray((load_image('chelsea') * 255 + 0.5).astype(np.uint8)).save(photo)
    shot = Path(os.environ.get('DIFFSR_SCREENSHOT') or tmp_path / 'demo.png')
    shot.parent.mkdir(parents=True, exist_ok=True)

    first = default_model(models_available()[0], 4)  # the model the page preselects for x4 (a trained one when shipped)
    demo = launch_demo(make_demo(), host='127.0.0.1', port=free_port(), where='script')
    driver = None
    try:
        driver = chrome_driver()
        wait = WebDriverWait(driver, WAIT)
        driver.get(demo.local_url)
        upload = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, '#upload input[type=file]')))
        upload.send_keys(str(photo))
        wait.until(EC.text_to_be_present_in_element((By.ID, 'upload'), photo.stem))  # upload finished: its name is listed
        wait.until(EC.element_to_be_clickable((By.ID, 'run'))).click()
        size = wait.until(lambda d: d.execute_script(
            "const i = document.querySelector('#sr-image img');"
            "return i && i.complete && i.naturalWidth > 0 ? [i.naturalWidth, i.naturalHeight] : null;"))
        assert size == [448, 300], size  # the SR image of the uploaded photo, x4
        wait.until(EC.text_to_be_present_in_element((By.ID, 'notes'), photo.name))
        notes = driver.find_element(By.ID, 'notes').text
        assert f'{first} x4' in notes and 'classic pipeline' in notes and 'sample' not in notes, notes  # upload cleared it
        driver.execute_script('window.scrollTo(0, 0)')
        assert driver.save_screenshot(str(shot)), f'could not write {shot}'
    finally:
        if driver is not None: driver.quit()
        demo.close()
    with Image.open(shot) as im: assert im.size[0] >= 1000 and im.size[1] >= 800, im.size
