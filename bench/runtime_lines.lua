-- Helper of bench/runtime_bench.sh: runs `sh -c GEN` and counts its stdout lines through a
-- line callback, then prints the count, the run's own duration and opsrun's peak RSS
-- (VmHWM of /proc/self/status, read at the end): "lines=N seconds=S hwm_kib=K".
local gen = assert((...), "usage: opsrun bench/runtime_lines.lua 'GENERATOR COMMAND'")
local n = 0
local t0 = ops.time.monotonic()
local r = assert(ops.proc.run({ "sh", "-c", gen }, { stdout = function(line) n = n + 1 end }))
local seconds = ops.time.monotonic() - t0
if not r.ok then error("generator failed: " .. tostring(r.code or r.signal) .. " " .. r.stderr) end
local hwm
for l in io.lines("/proc/self/status") do
  hwm = hwm or l:match("^VmHWM:%s+(%d+)")
end
print(string.format("lines=%d seconds=%.6f hwm_kib=%s", n, seconds, hwm))
