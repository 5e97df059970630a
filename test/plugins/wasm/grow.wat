;; Example WASM plugin (used by tests): a memory hog whose handle() grows its memory until the
;; host's memory limit refuses (memory.grow returns -1), then traps.
(module
  (memory (export "memory") 1)
  (func (export "alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "handle") (param i32 i32) (result i64)
    (loop $more
      (br_if $more (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))
    unreachable)
)
