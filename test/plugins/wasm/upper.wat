;; Example WASM plugin (used by tests, the benchmark and the docs): answers an event whose payload
;; is UTF-8 text with one event `text.upper` carrying the payload in upper case (ASCII letters).
;; ABI (loom_ros/plugins/sandbox/wasm.py): export `memory`, `alloc(len) -> ptr` and
;; `handle(ptr, len) -> i64` returning (out_ptr << 32) | out_len; input and output are JSON.
;; The input is compact JSON with a `"payload":"..."` member (a JSON string) when the payload is
;; text; this module finds that member and copies the string, upper-casing a-z.
(module
  (memory (export "memory") 2)
  (data (i32.const 0) "\"payload\":\"")                                     ;; 11 bytes at 0
  (data (i32.const 16) "{\"events\":[{\"type\":\"text.upper\",\"payload\":\"")  ;; 43 bytes at 16
  (data (i32.const 64) "\"}]}")                                             ;; 4 bytes at 64
  (data (i32.const 80) "{\"ok\":false,\"error\":\"no text payload\"}")    ;; 38 bytes at 80
  (global $in_len (mut i32) (i32.const 0))
  (global $heap i32 (i32.const 1024))

  ;; The host calls alloc once per event, then handle: the input always sits at $heap and the
  ;; output right after it, so memory is reused from call to call.
  (func (export "alloc") (param $len i32) (result i32)
    (local $need i32)
    ;; input + worst-case output (prefix + 2x input + suffix), in pages
    (local.set $need (i32.add (i32.add (global.get $heap) (i32.mul (local.get $len) (i32.const 3)))
                              (i32.const 128)))
    (local.set $need (i32.shr_u (i32.add (local.get $need) (i32.const 65535)) (i32.const 16)))
    (if (i32.gt_u (local.get $need) (memory.size))
      (then
        (if (i32.eq (memory.grow (i32.sub (local.get $need) (memory.size))) (i32.const -1))
          (then (return (i32.const 0))))))
    (global.set $in_len (local.get $len))
    (global.get $heap))

  ;; Index just past `"payload":"` in [ptr, ptr+len), or -1.
  (func $find (param $ptr i32) (param $len i32) (result i32)
    (local $i i32) (local $j i32) (local $end i32)
    (local.set $end (i32.sub (i32.add (local.get $ptr) (local.get $len)) (i32.const 11)))
    (local.set $i (local.get $ptr))
    (block $done
      (loop $scan
        (br_if $done (i32.gt_s (local.get $i) (local.get $end)))
        (local.set $j (i32.const 0))
        (block $mismatch
          (loop $cmp
            (br_if $mismatch (i32.ne (i32.load8_u (i32.add (local.get $i) (local.get $j)))
                                     (i32.load8_u (local.get $j))))
            (local.set $j (i32.add (local.get $j) (i32.const 1)))
            (if (i32.eq (local.get $j) (i32.const 11))
              (then (return (i32.add (local.get $i) (i32.const 11)))))
            (br $cmp)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $scan)))
    (i32.const -1))

  (func (export "handle") (param $ptr i32) (param $len i32) (result i64)
    (local $src i32) (local $end i32) (local $out i32) (local $o i32) (local $c i32)
    (local.set $src (call $find (local.get $ptr) (local.get $len)))
    (if (i32.eq (local.get $src) (i32.const -1))
      (then (return (i64.or (i64.shl (i64.const 80) (i64.const 32)) (i64.const 38)))))
    (local.set $end (i32.add (local.get $ptr) (local.get $len)))
    (local.set $out (i32.add (local.get $ptr) (local.get $len)))
    (memory.copy (local.get $out) (i32.const 16) (i32.const 43))
    (local.set $o (i32.add (local.get $out) (i32.const 43)))
    (block $done
      (loop $copy
        (br_if $done (i32.ge_u (local.get $src) (local.get $end)))
        (local.set $c (i32.load8_u (local.get $src)))
        (br_if $done (i32.eq (local.get $c) (i32.const 34)))            ;; closing quote
        (if (i32.eq (local.get $c) (i32.const 92))                       ;; backslash: copy 2
          (then
            (i32.store8 (local.get $o) (local.get $c))
            (local.set $o (i32.add (local.get $o) (i32.const 1)))
            (local.set $src (i32.add (local.get $src) (i32.const 1)))
            (local.set $c (i32.load8_u (local.get $src))))
          (else
            (if (i32.and (i32.ge_u (local.get $c) (i32.const 97)) (i32.le_u (local.get $c) (i32.const 122)))
              (then (local.set $c (i32.sub (local.get $c) (i32.const 32)))))))
        (i32.store8 (local.get $o) (local.get $c))
        (local.set $o (i32.add (local.get $o) (i32.const 1)))
        (local.set $src (i32.add (local.get $src) (i32.const 1)))
        (br $copy)))
    (memory.copy (local.get $o) (i32.const 64) (i32.const 4))
    (local.set $o (i32.add (local.get $o) (i32.const 4)))
    (i64.or (i64.shl (i64.extend_i32_u (local.get $out)) (i64.const 32))
            (i64.extend_i32_u (i32.sub (local.get $o) (local.get $out)))))
)
