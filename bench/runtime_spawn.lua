-- Helper of bench/runtime_bench.sh: N sequential ops.proc.run{"/bin/true"} (default 1000),
-- each checked. Prints the loop's own duration: "spawn_seconds=S".
local n = tonumber((...)) or 1000
local t0 = ops.time.monotonic()
for _ = 1, n do
  local r = ops.proc.run({ "/bin/true" })
  if not (r and r.ok) then error("/bin/true failed") end
end
print(string.format("spawn_seconds=%.6f", ops.time.monotonic() - t0))
