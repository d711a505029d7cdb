"""The lessons' widgets in a real JupyterLab, driven by headless Chromium: lessons 01 and 03 open without a kernel dialog,
run top to bottom (Run > Run All Cells, fast mode), and their panels redraw when a slider or a dropdown moves; lesson
13's inline demo page appears under its cell and returns an SR image when its Upscale button is clicked.

Same requirements and the same skip/fail rule as the demo's browser test (tests/test_demo_browser.py), plus JupyterLab
(the dev extra). The lessons are copied to a temporary folder first, so JupyterLab's autosave never touches the repository."""
import os, shutil, subprocess, sys, time, urllib.request
from pathlib import Path

import pytest

from test_demo_browser import WAIT, _need_browser, browser_required, chrome_driver

LESSONS = Path(__file__).resolve().parents[1] / 'nbs' / 'lessons'
RUN_WAIT = 300  # seconds for a whole lesson to run in fast mode on a loaded 2-core machine


def _need_jupyterlab():
    try: import jupyterlab  # noqa: F401
    except ImportError:
        why = 'Lesson browser test needs JupyterLab: pip install jupyterlab (the dev extra).'
        if browser_required(): pytest.fail(why + ' (required here: CI=true or DIFFSR_REQUIRE_BROWSER=1)', pytrace=False)
        pytest.skip(why)


@pytest.fixture(scope='module')
def lab(tmp_path_factory):
    "(driver, base url) of a JupyterLab on 127.0.0.1 serving a copy of lessons 01 and 03."
    _need_browser(); _need_jupyterlab()
    from diffsr_kit.demo import free_port
    root = tmp_path_factory.mktemp('lab')
    for f in [*sorted(LESSONS.glob('[0-9][0-9]_*.ipynb')), LESSONS / 'references.md']: shutil.copy(f, root)
    settings = root / '.jupyter' / 'lab' / 'user-settings' / '@jupyterlab'
    (settings / 'notebook-extension').mkdir(parents=True)  # every cell in the page (no windowing), so every prompt can be checked
    (settings / 'notebook-extension' / 'tracker.jupyterlab-settings').write_text('{"windowingMode": "none"}')
    (settings / 'apputils-extension').mkdir()
    (settings / 'apputils-extension' / 'notification.jupyterlab-settings').write_text('{"fetchNews": "false"}')
    port, token = free_port(), 'diffsr-test'
    env = {**os.environ, 'DIFFSR_FAST': '1', 'OMP_NUM_THREADS': '1', 'JUPYTER_CONFIG_DIR': str(root / '.jupyter'),
           'MPLBACKEND': 'module://matplotlib_inline.backend_inline'}
    log = open(root / 'jupyterlab.log', 'w')
    srv = subprocess.Popen([sys.executable, '-m', 'jupyterlab', '--no-browser', '--ip=127.0.0.1', f'--port={port}', '--allow-root',
                            f'--ServerApp.token={token}', f'--ServerApp.root_dir={root}', '--LabApp.news_url=',
                            '--ServerApp.open_browser=False'], env=env, stdout=log, stderr=subprocess.STDOUT)
    driver = None
    try:
        t0 = time.time()
        while True:  # bounded wait for the server
            try: urllib.request.urlopen(f'http://127.0.0.1:{port}/api?token={token}', timeout=2); break
            except OSError:
                if time.time() - t0 > WAIT or srv.poll() is not None:
                    pytest.fail(f'JupyterLab did not start: {(root / "jupyterlab.log").read_text()[-2000:]}')
                time.sleep(0.5)
        driver = chrome_driver('1400,1000')
        yield driver, f'http://127.0.0.1:{port}', token
    finally:
        if driver is not None: driver.quit()
        srv.terminate()
        try: srv.wait(30)
        except subprocess.TimeoutExpired: srv.kill()
        log.close()


def _open(driver, url, token, name):
    "Open a lesson in a workspace of its own and wait for its kernel; fail if a dialog (the kernel chooser) appears instead."
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    driver.get(f'{url}/lab/workspaces/{Path(name).stem[:2]}/tree/{name}?token={token}&reset')  # its own workspace: one notebook open
    wait = WebDriverWait(driver, WAIT)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '.jp-Notebook .jp-CodeCell'))
    wait.until(lambda d: 'Idle' in d.find_element(By.CSS_SELECTOR, '.jp-StatusBar-Widget, #jp-main-statusbar').text
               or d.find_elements(By.CSS_SELECTOR, '.jp-Dialog'))
    dialogs = [e.text for e in driver.find_elements(By.CSS_SELECTOR, '.jp-Dialog')]
    assert not dialogs, f'{name} opened with a dialog (no kernelspec?): {dialogs}'


def _open_and_run(driver, url, token, name, until: str = ''):
    "Open a lesson, check that no dialog (kernel choice) appears, run all cells (or those above the cell containing `until`)."
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    _open(driver, url, token, name)
    wait = WebDriverWait(driver, WAIT)
    command = 'runmenu:run-all'
    if until:  # select the cell that contains `until`, then Run > Run All Above Selected Cell
        cell = driver.execute_script("return [...document.querySelectorAll('.jp-CodeCell')].find(e => e.textContent.includes(arguments[0]));",
                                     until)
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", cell)
        cell.find_element(By.CSS_SELECTOR, '.jp-InputPrompt').click()  # a real click: the cell becomes the selected one
        command = 'notebook:run-all-above'
    driver.find_element(By.XPATH, "//div[contains(@class,'lm-MenuBar-itemLabel') and text()='Run']").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f'li[data-command="{command}"]'))[0].click()
    state = ("const p = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(e => e.textContent);"
             "const err = [...document.querySelectorAll('.jp-OutputArea-output')].map(e => e.textContent)"
             "  .filter(t => t.includes('Traceback') || /^\\w*(Error|Exception)\\b/m.test(t));"
             "if (err.length) return 'error: ' + err[0].slice(-1500);"
             "if (arguments[0]) { const i = p.findIndex((t, k) => document.querySelectorAll('.jp-CodeCell')[k].textContent.includes(arguments[0]));"
             "  return i > 0 && p.slice(0, i).every(t => /\\[\\d+\\]/.test(t)) ? 'done' : null; }"
             "return p.length > 0 && p.every(t => /\\[\\d+\\]/.test(t)) ? 'done' : null;")
    end = WebDriverWait(driver, RUN_WAIT).until(lambda d: d.execute_script(state, until))  # every cell ran, or one raised
    assert end == 'done', f'{name}: {end}'


def _panel_image(driver, i=0):
    "The src of the i-th image inside a widget output area (a panel's current picture)."
    return driver.execute_script(f"const im = document.querySelectorAll('.widget-output img, .jupyter-widgets-output-area img')[{i}];"
                                 "return im ? im.src : null;")


def test_lesson01_panel_redraws_when_a_slider_moves(lab):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    driver, url, token = lab
    _open_and_run(driver, url, token, '01_where_lr_images_come_from.ipynb')
    before = WebDriverWait(driver, WAIT).until(lambda d: _panel_image(d))
    noise = next(s for s in driver.find_elements(By.CSS_SELECTOR, '.widget-slider') if 'noise' in s.text)
    readout = noise.find_element(By.CSS_SELECTOR, '.widget-readout')
    assert readout.text.strip() == '5.00'  # the panel opened as built (the self-check cell handed it back)
    readout.click(); readout.send_keys(Keys.CONTROL, 'a'); readout.send_keys('30', Keys.ENTER)
    WebDriverWait(driver, WAIT).until(lambda d: _panel_image(d) not in (None, before))
    assert noise.find_element(By.CSS_SELECTOR, '.widget-readout').text.strip() == '30.00'


def test_lesson03_panels_redraw_on_dropdown_and_slider(lab):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait
    driver, url, token = lab
    _open_and_run(driver, url, token, '03_comparing_schedules.ipynb')
    n = driver.execute_script("return document.querySelectorAll('.widget-output img, .jupyter-widgets-output-area img').length")
    assert n >= 1, 'no widget picture rendered'
    last = n - 1  # the respacing panel is the lesson's last widget output
    before = WebDriverWait(driver, WAIT).until(lambda d: _panel_image(d, last))
    drop = [s for s in driver.find_elements(By.CSS_SELECTOR, '.widget-dropdown') if 'schedule' in s.text][-1]
    Select(drop.find_element(By.TAG_NAME, 'select')).select_by_visible_text('linear')
    after_drop = WebDriverWait(driver, WAIT).until(lambda d: (s := _panel_image(d, last)) not in (None, before) and s)
    k = [s for s in driver.find_elements(By.CSS_SELECTOR, '.widget-slider') if s.text.strip().startswith('k')][-1]
    handle = k.find_element(By.CSS_SELECTOR, '.noUi-handle')
    handle.click(); handle.send_keys(Keys.ARROW_RIGHT)
    WebDriverWait(driver, WAIT).until(lambda d: _panel_image(d, last) not in (None, after_drop))
    assert k.find_element(By.CSS_SELECTOR, '.widget-readout').text.strip() == '100'  # the stop after K = 50


def test_lesson13_inline_demo_appears_and_upscales(lab, tmp_path):
    "The cells up to the one that closes the demo: its page is an iframe under the launch cell; an upload comes back x4."
    import numpy as np
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait
    from diffsr_kit.data import load_image
    photo = tmp_path / 'chelsea_crop.png'  # 128x96 HR -> LR 32x24 at x4 (classic): a request of a few seconds
    Image.fromarray((load_image('chelsea')[100:196, 100:228] * 255 + 0.5).astype(np.uint8)).save(photo)
    driver, url, token = lab
    _open_and_run(driver, url, token, '13_demo_in_notebook.ipynb', until='app.close()')
    frame = WebDriverWait(driver, WAIT).until(lambda d: d.find_elements(By.CSS_SELECTOR, '.jp-OutputArea-output iframe'))[0]
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", frame)
    driver.switch_to.frame(frame)
    try:
        wait = WebDriverWait(driver, WAIT)
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, '#upload input[type=file]'))).send_keys(str(photo))
        wait.until(EC.text_to_be_present_in_element((By.ID, 'upload'), photo.stem))  # the upload finished
        wait.until(EC.element_to_be_clickable((By.ID, 'run'))).click()
        size = WebDriverWait(driver, RUN_WAIT).until(lambda d: d.execute_script(
            "const i = document.querySelector('#sr-image img');"
            "return i && i.complete && i.naturalWidth > 0 ? [i.naturalWidth, i.naturalHeight] : null;"))
        assert size == [128, 96], size  # the SR image of the upload, x4 of its 32x24 LR
    finally:
        driver.switch_to.default_content()


def test_every_lesson_opens_without_a_kernel_dialog(lab):
    "All 14 lessons carry a kernelspec: JupyterLab starts their kernel without asking (nothing is run here)."
    driver, url, token = lab
    names = sorted(p.name for p in LESSONS.glob('[0-9][0-9]_*.ipynb'))
    assert len(names) == 14
    for name in names: _open(driver, url, token, name)
