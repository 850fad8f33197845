-- ops.time: clocks. ops.sleep waits.
local core = require "ops.core.time"
local sched = require "ops.core.sched"

local time = {
  now = core.now, -- wall clock, seconds since the epoch (float)
  monotonic = core.monotonic, -- never goes back; for durations and deadlines
  iso8601 = core.iso8601, -- "2026-11-23T23:26:08.123Z"
}

function time.sleep(seconds)
  sched.sleep(seconds)
end

return time
