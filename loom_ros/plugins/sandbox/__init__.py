"""Sandboxed plugins: proxies that present the plugin contract (loom_ros.plugins.contract.Plugin)
while the plugin itself runs in wasmtime (WasmPlugin) or in a child process with resource limits
(SubprocessPlugin). A host treats them like in-process plugins.

`sandboxed_plugin(mode, target, options)` is the one seam a host needs: mode `wasm` takes a module
path, mode `subprocess` an entry point name or `module:Class`.
"""
from __future__ import annotations

import inspect
from typing import Any

from loom_ros.plugins.contract import Plugin, PluginError

SANDBOX_MODES = ('wasm', 'subprocess')


def sandboxed_plugin(mode: str, target: str, options: dict[str, Any] | None = None) -> Plugin:
    """A proxy plugin for `target` run in sandbox `mode`, with limits from `options`."""
    options = dict(options or {})
    if mode == 'wasm':
        from loom_ros.plugins.sandbox.wasm import WasmPlugin as proxy
    elif mode == 'subprocess':
        from loom_ros.plugins.sandbox.subprocess import SubprocessPlugin as proxy
    else:
        raise PluginError(f'unknown sandbox mode {mode!r}; use one of {", ".join(SANDBOX_MODES)}')
    known = [name for name in inspect.signature(proxy.__init__).parameters
             if name not in ('self', 'module', 'target')]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise PluginError(f'{target}: unknown {mode} sandbox option(s) {", ".join(unknown)}; '
                          f'known: {", ".join(known)}')
    return proxy(target, **options)
