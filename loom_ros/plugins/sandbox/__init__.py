"""Sandboxed plugins: proxies that present the plugin contract (loom_ros.plugins.contract.Plugin)
while the plugin itself runs in wasmtime (WasmPlugin) or in a child process with resource limits
(SubprocessPlugin). A host treats them like in-process plugins.

`sandboxed_plugin(mode, target, options)` is the one seam a host needs: mode `wasm` takes a module
path, mode `subprocess` an entry point name or `module:Class`.
"""
from __future__ import annotations

from typing import Any

from loom_ros.plugins.contract import Plugin, PluginError

SANDBOX_MODES = ('wasm', 'subprocess')


def sandboxed_plugin(mode: str, target: str, options: dict[str, Any] | None = None) -> Plugin:
    """A proxy plugin for `target` run in sandbox `mode`, with limits from `options`."""
    options = dict(options or {})
    if mode == 'wasm':
        from loom_ros.plugins.sandbox.wasm import WasmPlugin
        return WasmPlugin(target, **options)
    if mode == 'subprocess':
        from loom_ros.plugins.sandbox.subprocess import SubprocessPlugin
        return SubprocessPlugin(target, **options)
    raise PluginError(f'unknown sandbox mode {mode!r}; use one of {", ".join(SANDBOX_MODES)}')
