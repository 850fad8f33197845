-- ops.time: clocks. ops.sleep waits.
local core = require "ops.core.time"
local sched = require "ops.core.sched"

local time = {
  now = core.now, -- wall clock, seconds since the epoch (float)
  monotonic = core.monotonic, -- never goes back; for durations and deadlines
  iso8601 = core.iso8601, -- "2026-11-23T23:26:08.123Z"
}

--- time.stamp(t) -> "2026-11-23 23:26:08" (UTC, to the second) for a time in seconds since
--- the epoch; "-" for nil (a run not finished yet): for listings
function time.stamp(t)
  if t == nil then return "-" end
  return (core.iso8601(t):sub(1, 19):gsub("T", " "))
end

function time.sleep(seconds)
  sched.sleep(seconds)
end

return time
