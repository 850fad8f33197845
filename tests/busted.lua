-- Runs busted specs inside opsrun, so they reach the C primitives and run as a task:
--   opsrun tests/busted.lua [busted options] SPEC...
-- Spec files find their helpers in tests/lua/ (package.path) and the opsrun binary under
-- test in $OPSRUN (set by ctest), for the specs that start opsrun as a child.
package.path = "tests/lua/?.lua;" .. package.path
if not os.getenv("OPSRUN") then
  -- the specs that start opsrun as a child start this very binary
  local self = io.open("/proc/self/exe") and require("ops.fs").realpath("/proc/self/exe")
  ops.sys.setenv("OPSRUN", self or arg[-1])
end
local runner = require "busted.runner"
arg[0] = "busted"
runner({standalone = false, output = "utfTerminal"})
