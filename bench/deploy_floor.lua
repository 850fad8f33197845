-- bench/deploy_floor.lua SCRIPT: runs the commands of the deploy bench's sh baseline
-- ("cd DIR && CMD ARGS...", one per line, words without quotes) with ops.proc.run, one
-- after the other, each command's output read line by line as the deploy engine reads it.
-- What is left when the engine (configs, hooks, working copies, history, logging) is
-- taken away: the runtime's own cost of starting and watching the same processes.
local proc = require "ops.proc"
local script = assert(..., "usage: opsrun bench/deploy_floor.lua BASELINE.sh")
local cmds = {}
for line in io.lines(script) do
  local dir, cmd = line:match("^cd (%S+) && (.*)$")
  if dir then
    local argv = {}
    for w in cmd:gmatch("%S+") do argv[#argv + 1] = w end
    cmds[#cmds + 1] = {dir = dir, argv = argv}
  end
end
assert(#cmds > 0, script .. ": no command lines")
local lines = 0
local function count() lines = lines + 1 end
for _, c in ipairs(cmds) do
  assert(proc.run(c.argv, {cwd = c.dir, stdout = count, stderr = count}))
end
