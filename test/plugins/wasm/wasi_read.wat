;; Example WASM plugin (used by tests): imports WASI file-descriptor calls and tries to open a file
;; under the first preopened directory (fd 3). Without a WASI grant it must not even instantiate;
;; with WASI but no storage grant there is no preopened directory, so path_open fails (EBADF).
;; Answers {"events":[{"type":"wasi.errno","payload":"<errno digit(s)>"}]}.
(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_close" (func $fd_close (param i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "note.txt")                                                  ;; 8 bytes
  (data (i32.const 16) "{\"events\":[{\"type\":\"wasi.errno\",\"payload\":\"")    ;; 43 bytes
  (func (export "alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "handle") (param i32 i32) (result i64)
    (local $errno i32)
    ;; path_open(dirfd=3, dirflags=0, path=0, len=8, oflags=0, rights=fd_read, inheriting=none,
    ;;           fdflags=0, out fd at 512)
    (local.set $errno (call $path_open (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 8)
                        (i32.const 0) (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 512)))
    (if (i32.eqz (local.get $errno))
      (then (drop (call $fd_close (i32.load (i32.const 512))))))
    (memory.copy (i32.const 2048) (i32.const 16) (i32.const 43))
    ;; errno as two decimal digits, then "\"}]}"
    (i32.store8 (i32.const 2091) (i32.add (i32.const 48) (i32.div_u (local.get $errno) (i32.const 10))))
    (i32.store8 (i32.const 2092) (i32.add (i32.const 48) (i32.rem_u (local.get $errno) (i32.const 10))))
    (i32.store8 (i32.const 2093) (i32.const 34))
    (i32.store8 (i32.const 2094) (i32.const 125))
    (i32.store8 (i32.const 2095) (i32.const 93))
    (i32.store8 (i32.const 2096) (i32.const 125))
    (i64.or (i64.shl (i64.const 2048) (i64.const 32)) (i64.const 49)))
)
