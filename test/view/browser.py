"""Headless Chromium as a person's browser, driven over the DevTools protocol on a pipe
(`--remote-debugging-pipe`: JSON messages ended by NUL on fds 3 and 4, no websocket library):
open a page, take screenshots until one shows what the caller waits for, keep the last.

Chromium is a Debian package (`apt-get install chromium`), not part of Loom's setup: `find()`
says None where it is missing and the tests skip with that reason. WebGL runs on SwiftShader
(software), which is what a laptop without a GPU gives the Rerun viewer too."""
from __future__ import annotations

import base64
import io
import json
import os
import select
import shutil
import subprocess
import time
from collections.abc import Callable

FLAGS = ('--headless=new', '--no-sandbox', '--use-angle=swiftshader',
         '--enable-unsafe-swiftshader', '--disable-dev-shm-usage', '--no-first-run',
         '--remote-debugging-pipe', '--hide-scrollbars', '--mute-audio')


def find() -> str | None:
    for name in ('chromium', 'chromium-browser', 'google-chrome'):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    def __init__(self, profile_dir: str, width: int = 1280, height: int = 800):
        to_chrome, self._out = os.pipe()
        self._in, from_chrome = os.pipe()

        def wire():   # in the child, before exec: its fd 3 reads our messages, fd 4 answers
            os.dup2(to_chrome, 3)
            os.dup2(from_chrome, 4)
            os.set_inheritable(3, True)   # dup2 onto itself keeps close-on-exec
            os.set_inheritable(4, True)
        self.proc = subprocess.Popen(
            [find(), *FLAGS, f'--user-data-dir={profile_dir}', f'--window-size={width},{height}',
             'about:blank'], preexec_fn=wire, close_fds=False,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome)
        os.close(from_chrome)
        self.width, self.height = width, height
        self._next = 0
        self._buffer = b''

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             limit: float = 60.0) -> dict:
        self._next += 1
        msg = {'id': self._next, 'method': method, 'params': params or {}}
        if session:
            msg['sessionId'] = session
        os.write(self._out, json.dumps(msg).encode() + b'\0')
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            while b'\0' in self._buffer:
                raw, self._buffer = self._buffer.split(b'\0', 1)
                reply = json.loads(raw)
                if reply.get('id') == self._next:
                    if 'error' in reply:
                        raise RuntimeError(f'{method}: {reply["error"]}')
                    return reply['result']
            if not select.select([self._in], [], [], max(0.0, deadline - time.monotonic()))[0]:
                break
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise RuntimeError(f'chromium closed the pipe during {method}')
            self._buffer += chunk
        raise TimeoutError(f'{method}: no answer in {limit:.0f} s')

    def open(self, url: str) -> str:
        target = self.call('Target.createTarget', {'url': url})['targetId']
        session = self.call('Target.attachToTarget', {'targetId': target, 'flatten': True}
                            )['sessionId']
        self.call('Emulation.setDeviceMetricsOverride', {
            'width': self.width, 'height': self.height, 'deviceScaleFactor': 1,
            'mobile': False}, session)
        return session

    def screenshot(self, session: str, limit: float = 120.0):
        """The page as a PIL image (RGB)."""
        from PIL import Image
        data = self.call('Page.captureScreenshot', {'format': 'png'}, session, limit=limit)['data']
        return Image.open(io.BytesIO(base64.b64decode(data))).convert('RGB')

    def wait_for(self, session: str, shows: Callable[[object], bool], limit: float,
                 every_s: float = 1.0):
        """Screenshots until `shows(image)`; (True, image) or (False, the last one) at `limit`."""
        deadline = time.monotonic() + limit
        image = None
        while time.monotonic() < deadline:
            image = self.screenshot(session)
            if shows(image):
                return True, image
            time.sleep(every_s)   # between polls of a condition, not a wait for it
        return False, image

    def close(self) -> None:
        try:
            self.call('Browser.close', limit=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._out)
        os.close(self._in)
