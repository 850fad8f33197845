-- examples/parallel.lua: runs a few commands at once and prints a summary.
--   build/opsrun examples/parallel.lua [seconds]
-- Each command is a task; their output is streamed line by line with a prefix while
-- they run, and the summary shows that the wall time is that of the slowest, not the sum.
local seconds = tonumber(arg[1]) or 1

local jobs = {
  {name = "kernel", argv = {"uname", "-sr"}},
  {name = "disk", argv = {"df", "-h", "/"}},
  {name = "slow-1", argv = {"sh", "-c", "sleep " .. seconds .. "; echo slept " .. seconds .. "s"}},
  {name = "slow-2", argv = {"sh", "-c", "sleep " .. seconds .. "; echo slept " .. seconds .. "s"}},
  {name = "counter", argv = {"sh", "-c", "for i in 1 2 3; do echo tick $i; sleep 0.2; done"}},
  {name = "failing", argv = {"sh", "-c", "echo about to fail >&2; exit 3"}},
}

local started = ops.time.monotonic()
local tasks = {}
for i, job in ipairs(jobs) do
  local function show(line) print(string.format("%-8s | %s", job.name, line)) end
  tasks[i] = ops.spawn(ops.proc.run, job.argv, {stdout = show, stderr = show, timeout = 60})
end
local _, outcomes = ops.wait_all(tasks)
local wall = ops.time.monotonic() - started

print()
print(string.format("%-8s  %-7s  %8s", "job", "status", "seconds"))
local total, failed = 0, 0
for i, job in ipairs(jobs) do
  local r = outcomes[i][1]
  local status = r and (r.ok and "ok" or ("exit " .. tostring(r.code or r.signal))) or "error"
  if not (r and r.ok) then failed = failed + 1 end
  total = total + (r and r.duration or 0)
  print(string.format("%-8s  %-7s  %8.2f", job.name, status, r and r.duration or 0))
end
print(string.format("\n%d jobs, %d failed (one on purpose); %.2fs of work in %.2fs of wall time",
  #jobs, failed, total, wall))
return failed == 1 and 0 or 1
