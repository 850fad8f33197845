-- ops.deploy.failure: a failure the user caused (a bad config, a failing tool), told as a
-- message with no Lua traceback. Any other error is a bug and keeps its traceback.
local failure = {}

local MT = {__tostring = function(e) return e.message end}

--- failure.raise(message) : raises a user-facing failure
function failure.raise(message)
  error(setmetatable({message = message, step_failure = true}, MT), 0)
end

--- failure.is(err) -> true for a failure raised by failure.raise or a step:fail
function failure.is(err)
  return type(err) == "table" and (getmetatable(err) == MT or err.step_failure == true)
end

--- failure.message(err) -> string
function failure.message(err)
  if failure.is(err) then return tostring(err.message) end
  return tostring(err)
end

return failure
