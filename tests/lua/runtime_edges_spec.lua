-- Review of the runtime's C (sched.c, proc.c, sys.c): each test pins a bug that was found
-- and fixed. The ones that could crash or hang opsrun run in a child opsrun.
local h = require "helpers"

local function sub(code, opts)
  local o = {timeout = 30}
  for k, v in pairs(opts or {}) do o[k] = v end
  return h.run_opsrun({"-e", code}, o)
end

local function clean(r)
  -- a child opsrun built with sanitizers says so on stderr
  assert.is_nil(r.stderr:match("Sanitizer"), r.stderr)
  assert.is_nil(r.stderr:match("runtime error"), r.stderr)
end

describe("review: the run queue", function()
  it("returns to the loop when the last task of a round is cancelled", function()
    -- the round ends at the task that was last when it began; cancelling that task must
    -- not make the round go on for ever while another task keeps yielding
    local fired = false
    local sleeper = ops.spawn(function() ops.sleep(0); fired = true end)
    local last
    local a = ops.spawn(function() last:cancel() end)
    local spinner = ops.spawn(function()
      for _ = 1, 100000 do
        if fired then return true end
        ops.yield()
      end
      return false
    end)
    last = ops.spawn(function() ops.sleep(10) end)
    local ok, saw = spinner:wait()
    assert.is_true(ok)
    assert.is_true(saw, "timers never ran: the round did not end")
    a:wait()
    sleeper:wait()
  end)
end)

describe("review: sleeping", function()
  it("does not sleep for ever on a NaN", function()
    local t = ops.spawn(function() ops.sleep(0 / 0); return "woke" end)
    assert.are.same({true, "woke"}, {t:wait(2)})
  end)
end)

describe("review: cancellation", function()
  it("frees the timeout timer of a task still waiting when opsrun ends", function()
    local r = sub([[
      ops.spawn(function() ops.sleep(0); require("ops.core.sched").suspend() end)
      ops.sleep(0.01)
    ]])
    clean(r)
    assert.are.equal(0, r.code, r.stderr)
  end)
end)

describe("review: the environment", function()
  it("sys.setenv refuses what setenv(3) would cut or misread, and changes nothing", function()
    local sys = require "ops.sys"
    sys.setenv("OPSRUN_SPEC_ENV", "before")
    for _, c in ipairs({
      {"OPSRUN_SPEC_ENV", "a\0b", "bad argument #2 to 'setenv' (contains a NUL byte)"},
      {"OPSRUN_SPEC_ENV\0X", "x", "bad argument #1 to 'setenv' (not a valid variable name)"},
      {"OPSRUN_SPEC_ENV=X", "x", "bad argument #1 to 'setenv' (not a valid variable name)"},
      {"", "x", "bad argument #1 to 'setenv' (not a valid variable name)"},
    }) do
      local ok, err = pcall(sys.setenv, c[1], c[2])
      assert.is_false(ok)
      assert.matches(c[3], err, 1, true)
    end
    assert.are.equal("before", sys.getenv("OPSRUN_SPEC_ENV"))
    sys.setenv("OPSRUN_SPEC_ENV", nil)
    assert.is_nil(sys.getenv("OPSRUN_SPEC_ENV"))
  end)
end)

describe("review: paths with a NUL byte", function()
  it("are refused, not cut at the NUL (which would name another file)", function()
    local cases = {
      {function() return ops.yaml.load_file("/etc/hostname\0.yaml") end, "bad argument #1 to 'load_file' (path contains a NUL byte)"},
      {function() return require("ops.store").open("/tmp/opsrun-spec.db\0x") end, "bad argument #1 to 'open' (path contains a NUL byte)"},
      {function() return ops.proc.run({"pwd"}, {cwd = "/tmp\0/etc"}) end, "opts.cwd contains a NUL byte"},
      {function() return ops.proc.run({"pwd"}, {cwd = 5}) end, "opts.cwd must be a path (a string), not number"},
      {function() return ops.proc.run({"true"}, {stdout = {path = "/tmp/opsrun-spec-out\0x"}}) end,
        "opts.stdout.path contains a NUL byte"},
      {function() return ops.proc.run({"true"}, {stderr = {path = 7}}) end, "opts.stderr.path must be a path (a string), not number"},
      {function() return ops.proc.run({"cat"}, {stdin = {path = "/etc/hostname\0x"}}) end, "opts.stdin.path contains a NUL byte"},
    }
    for i, c in ipairs(cases) do
      local ok, err = pcall(c[1])
      assert.is_false(ok, "case " .. i)
      assert.matches(c[2], err, 1, true)
    end
    assert.is_nil(io.open("/tmp/opsrun-spec.db"))
    assert.is_nil(io.open("/tmp/opsrun-spec-out"))
  end)
end)

describe("review: processes", function()
  it("takes math.huge as no deadline", function()
    local r = assert(ops.proc.run({"sleep", "0.2"}, {timeout = math.huge}))
    assert.is_false(r.timed_out)
    assert.is_true(r.ok)
  end)

  it("does not keep opsrun alive for input nobody reads once the run is over", function()
    -- the child leaves a daemon that holds its stdin and never reads it
    local r = sub([[
      local r = assert(ops.proc.run({"sh", "-c", "exec 3<&0; setsid sleep 6 <&3 >/dev/null 2>&1 & exit 0"},
                                    {stdin = string.rep("x", 4 * 1024 * 1024)}))
      assert(r.ok)
    ]])
    clean(r)
    assert.are.equal(0, r.code, r.stderr)
    assert.is_true(r.duration < 4, "opsrun waited " .. r.duration .. " s for the daemon")
  end)

  it("exits on SIGTERM once its children are reaped, whatever still holds their pipes", function()
    local r = sub([[
      local p = assert(ops.proc.spawn({"sh", "-c", "setsid sleep 8 & exec sleep 30"}))
      ops.sleep(0.2)
      ops.sys.kill(ops.sys.pid(), "SIGTERM")
      p:wait()
    ]])
    clean(r)
    assert.are.equal(143, r.code, r.stderr)
    assert.is_true(r.duration < 5, "opsrun took " .. r.duration .. " s to exit")
  end)
end)
