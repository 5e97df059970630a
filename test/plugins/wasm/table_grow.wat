;; Example WASM plugin (used by tests): a table hog. handle() calls table.grow 64 times, 65536
;; elements each (about 4 M elements, 32 MB unbounded), counting the grows the host refuses (-1),
;; and answers "<refused grows> <final table size>". Under the store's table limit all but the
;; first grow fail and the table stays at the limit.
(module
  (memory (export "memory") 1)
  (table $t (export "table") 1 funcref)
  (data (i32.const 0) "{\22events\22:[{\22type\22:\22table.size\22,\22payload\22:\22")
  (func (export "alloc") (param i32) (result i32) (i32.const 1024))
  (func $digits (param $at i32) (param $n i32) (result i32)
    ;; writes $n in decimal at $at (10 digits, zero-padded); returns the next position
    (local $i i32)
    (local.set $i (i32.const 9))
    (loop $more
      (i32.store8 (i32.add (local.get $at) (local.get $i))
                  (i32.add (i32.const 48) (i32.rem_u (local.get $n) (i32.const 10))))
      (local.set $n (i32.div_u (local.get $n) (i32.const 10)))
      (local.set $i (i32.sub (local.get $i) (i32.const 1)))
      (br_if $more (i32.ge_s (local.get $i) (i32.const 0))))
    (i32.add (local.get $at) (i32.const 10)))
  (func (export "handle") (param i32 i32) (result i64)
    (local $round i32) (local $refused i32) (local $at i32)
    (loop $grow
      (if (i32.eq (table.grow $t (ref.null func) (i32.const 65536)) (i32.const -1))
        (then (local.set $refused (i32.add (local.get $refused) (i32.const 1)))))
      (local.set $round (i32.add (local.get $round) (i32.const 1)))
      (br_if $grow (i32.lt_u (local.get $round) (i32.const 64))))
    ;; answer: {"events":[{"type":"table.size","payload":"RRRRRRRRRR SSSSSSSSSS"}]}
    (local.set $at (call $digits (i32.const 43) (local.get $refused)))
    (i32.store8 (local.get $at) (i32.const 32))
    (local.set $at (call $digits (i32.add (local.get $at) (i32.const 1)) (table.size $t)))
    (i32.store (local.get $at) (i32.const 0x7d5d7d22))  ;; "}]}
    (i64.or (i64.const 0) (i64.extend_i32_u (i32.add (local.get $at) (i32.const 4)))))
)
