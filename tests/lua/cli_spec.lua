-- The opsrun command line, run as a user runs it.
local h = require "helpers"

local function opsrun(args, opts)
  return h.run_opsrun(args, opts)
end

describe("opsrun SCRIPT", function()
  local dir
  before_each(function() dir = h.tmpdir() end)
  after_each(function() h.rmtree(dir) end)

  it("passes arguments as `arg` and `...`, like lua", function()
    h.write(dir .. "/s.lua", "print(arg[0], arg[1], arg[2], select('#', ...), ...)")
    local r = opsrun({dir .. "/s.lua", "a", "b c"})
    assert.are.equal(dir .. "/s.lua\ta\tb c\t2\ta\tb c\n", r.stdout)
    assert.are.equal(0, r.code)
  end)

  it("takes --opt=VALUE before the script, and gives the script every argument after it", function()
    h.write(dir .. "/s.lua", "print(select('#', ...), ...)")
    for _, pre in ipairs({{"--log-level=warn"}, {"--repo=" .. dir, "--log-format=text"}, {"--repo", dir}}) do
      local argv = {}
      for _, a in ipairs(pre) do argv[#argv + 1] = a end
      for _, a in ipairs({dir .. "/s.lua", "a", "--b=c", "last"}) do argv[#argv + 1] = a end
      local r = opsrun(argv)
      assert.are.equal(0, r.code, r.stderr)
      assert.are.equal("3\ta\t--b=c\tlast\n", r.stdout) -- the script's own --b=c left as written
    end
  end)

  it("uses an integer the script returns as the exit code", function()
    h.write(dir .. "/s.lua", "return 7")
    assert.are.equal(7, opsrun({dir .. "/s.lua"}).code)
  end)

  it("exits with os.exit's code, output flushed", function()
    h.write(dir .. "/s.lua", "io.write('partial'); os.exit(4)")
    local r = opsrun({dir .. "/s.lua"})
    assert.are.equal(4, r.code)
    assert.are.equal("partial", r.stdout)
  end)

  it("reports an uncaught error with a traceback and exits 1", function()
    h.write(dir .. "/s.lua", "local function f() error('went wrong') end\nf()\n")
    local r = opsrun({dir .. "/s.lua"})
    assert.are.equal(1, r.code)
    assert.matches("s.lua:1: went wrong", r.stderr)
    assert.matches("stack traceback", r.stderr)
  end)

  it("names the file and line of a syntax error", function()
    h.write(dir .. "/bad.lua", "x = = 1")
    local r = opsrun({dir .. "/bad.lua"})
    assert.are.equal(1, r.code)
    assert.matches("bad.lua:1:", r.stderr)
  end)

  it("says so when the script does not exist", function()
    local r = opsrun({dir .. "/missing.lua"})
    assert.are.equal(1, r.code)
    assert.matches("missing.lua", r.stderr)
  end)

  it("gives scripts the global ops and require 'ops'", function()
    h.write(dir .. "/s.lua", "print(ops == require('ops'), type(ops.proc.run))")
    assert.are.equal("true\tfunction\n", opsrun({dir .. "/s.lua"}).stdout)
  end)

  it("reports an error in a task nobody waited for and exits 1", function()
    h.write(dir .. "/s.lua", "ops.spawn(function() ops.sleep(0.01); error('lost in the background') end)")
    local r = opsrun({dir .. "/s.lua"})
    assert.are.equal(1, r.code)
    assert.matches("nobody waited for", r.stderr)
    assert.matches("lost in the background", r.stderr)
  end)

  it("keeps running background tasks after the main chunk returns", function()
    h.write(dir .. "/s.lua", "ops.spawn(function() ops.sleep(0.05); print('later') end) print('first')")
    assert.are.equal("first\nlater\n", opsrun({dir .. "/s.lua"}).stdout)
  end)

  it("says when the main task waits for something that can never come", function()
    h.write(dir .. "/s.lua", "require('ops.core.sched').suspend()")
    local r = opsrun({dir .. "/s.lua"})
    assert.are.equal(1, r.code)
    assert.matches("nothing is left that could wake it", r.stderr)
  end)
end)

describe("opsrun options", function()
  it("runs -e code", function()
    local r = opsrun({"-e", "print(1 + 1)"})
    assert.are.equal("2\n", r.stdout)
    assert.are.equal(0, r.code)
  end)

  it("prints the version", function()
    assert.matches("^opsrun %d+%.%d+%.%d+", opsrun({"-v"}).stdout)
    assert.matches("^opsrun %d+%.%d+%.%d+", opsrun({"--version"}).stdout)
  end)

  it("prints help on stdout with --help", function()
    local r = opsrun({"--help"})
    assert.are.equal(0, r.code)
    assert.matches("usage: opsrun", r.stdout)
  end)

  it("answers an unknown option or command with usage on stderr and exit 2", function()
    for _, args in ipairs({{"--bogus"}, {"bogus-command"}, {}, {"-e"}, {"--log-format", "xml", "-e", ""}}) do
      local r = opsrun(args)
      assert.are.equal(2, r.code, table.concat(args, " "))
      assert.matches("usage: opsrun", r.stderr)
      assert.are.equal("", r.stdout)
    end
  end)
end)

describe("opsrun which", function()
  it("tells where a built-in, an override and a system module come from", function()
    local dir = h.tmpdir()
    assert(ops.proc.run({"mkdir", "-p", dir .. "/.opsrun/ops"}).ok)
    h.write(dir .. "/.opsrun/ops/log.lua", "return require('ops').builtin('ops.log')")
    assert.matches("^builtin\t@?builtin/stdlib/ops/proc.lua\n$", opsrun({"which", "ops.proc"}).stdout)
    local r = opsrun({"--repo", dir, "which", "ops.log"})
    assert.are.equal("override\t" .. dir .. "/.opsrun/ops/log.lua\n", r.stdout)
    assert.matches("^path\t.*busted", opsrun({"which", "busted.runner"}).stdout)
    r = opsrun({"which", "no.such.module"})
    assert.are.equal(1, r.code)
    assert.matches("not found", r.stderr)
    h.rmtree(dir)
  end)

  it("loads a repo's override first, and ops.builtin still reaches the original", function()
    local dir = h.tmpdir()
    ops.proc.run({"mkdir", "-p", dir .. "/.opsrun/ops"})
    h.write(dir .. "/.opsrun/ops/proc.lua", [[
      local base = require("ops").builtin("ops.proc")
      local M = setmetatable({}, {__index = base})
      function M.run(argv, opts) io.write("wrapped ") return base.run(argv, opts) end
      return M
    ]])
    h.write(dir .. "/s.lua", "print(ops.proc.run({'echo', 'hi'}).stdout)")
    local r = opsrun({"--repo", dir, dir .. "/s.lua"})
    assert.are.equal("wrapped hi\n\n", r.stdout)
    assert.matches("shadows the built%-in", r.stderr)
    local _, n = r.stderr:gsub("shadows", "")
    assert.are.equal(1, n)
    h.rmtree(dir)
  end)

  it("loads built-ins from a source tree with OPSRUN_LUA_DIR", function()
    local dir = h.tmpdir()
    assert(ops.proc.run({"cp", "-r", h.source .. "/lua", dir .. "/lua"}).ok)
    h.write(dir .. "/lua/stdlib/ops/time.lua", "return {edited = true}")
    local r = opsrun({"-e", "print(require('ops.time').edited)"}, {env = {OPSRUN_LUA_DIR = dir .. "/lua"}})
    assert.are.equal("true\n", r.stdout)
    r = opsrun({"-e", "print(require('ops.time').edited)"})
    assert.are.equal("nil\n", r.stdout)
    h.rmtree(dir)
  end)
end)

describe("signals", function()
  it("forwards SIGTERM to its children, leaves no orphan, and exits 143", function()
    local dir = h.tmpdir()
    h.write(dir .. "/s.lua", string.format([[
      local p = ops.proc.spawn({"sh", "-c", "echo $$ > %s/child; exec sleep 300"})
      p:wait()
    ]], dir))
    local runner = ops.proc.spawn({h.opsrun, dir .. "/s.lua"})
    local child
    for _ = 1, 300 do
      child = tonumber(h.read(dir .. "/child") or "")
      if child then break end
      ops.sleep(0.01)
    end
    assert.is_number(child)
    ops.sys.kill(runner.pid, "SIGTERM")
    local r = runner:wait()
    assert.are.equal(143, r.code)
    for _ = 1, 100 do
      if not h.alive(child) then break end
      ops.sleep(0.01)
    end
    assert.is_false(h.alive(child))
    h.rmtree(dir)
  end)

  it("runs a Lua signal handler in a task instead", function()
    local dir = h.tmpdir()
    h.write(dir .. "/s.lua", [[
      local done = false
      ops.sys.on_signal("SIGTERM", function(name) print("got " .. name); done = true end)
      print("ready"); io.stdout:flush()
      while not done do ops.sleep(0.01) end
      return 5
    ]])
    local ready = false
    local p = assert(ops.proc.spawn({h.opsrun, dir .. "/s.lua"}, {stdout = function(line)
      if line == "ready" then ready = true end
    end}))
    while not ready do ops.sleep(0.01) end
    ops.sys.kill(p.pid, "SIGTERM")
    local r = p:wait()
    assert.are.equal(5, r.code)
    h.rmtree(dir)
  end)
end)
