-- Tasks: coroutines on the one loop.
local h = require "helpers"

describe("ops.spawn and task:wait", function()
  it("returns true and the task's results", function()
    local t = ops.spawn(function(a, b) ops.sleep(0.01); return a + b, "x" end, 2, 3)
    local ok, sum, x = t:wait()
    assert.is_true(ok)
    assert.are.equal(5, sum)
    assert.are.equal("x", x)
    assert.are.equal("done", t:status())
  end)

  it("returns false and the error of a task that failed", function()
    local t = ops.spawn(function() ops.sleep(0); error("kaput") end)
    local ok, err = t:wait()
    assert.is_false(ok)
    assert.matches("kaput", err)
    assert.are.equal("failed", t:status())
    assert.matches("stack traceback", t:traceback())
  end)

  it("keeps error objects as they were raised", function()
    local obj = {reason = "x"}
    local ok, err = ops.spawn(function() error(obj) end):wait()
    assert.is_false(ok)
    assert.are.equal(obj, err)
  end)

  it("gives up waiting after the timeout and leaves the task running", function()
    local t = ops.spawn(function() ops.sleep(0.3); return "late" end)
    local ok, why, code = t:wait(0.01)
    assert.is_false(ok)
    assert.are.equal("timeout", why)
    assert.are.equal("timeout", code)
    assert.are.same({true, "late"}, {t:wait()})
  end)

  it("lets several tasks wait for the same task", function()
    local gate = ops.spawn(function() ops.sleep(0.02); return 7 end)
    local a = ops.spawn(function() return select(2, gate:wait()) end)
    local b = ops.spawn(function() return select(2, gate:wait()) end)
    assert.are.same({true, 7}, {a:wait()})
    assert.are.same({true, 7}, {b:wait()})
  end)

  it("runs tasks in the order they became ready", function()
    local order = {}
    local ts = {}
    for i = 1, 5 do ts[i] = ops.spawn(function() order[#order + 1] = i end) end
    ops.wait_all(ts)
    assert.are.same({1, 2, 3, 4, 5}, order)
  end)

  it("interleaves tasks that yield", function()
    local trace = {}
    local function worker(name)
      for i = 1, 3 do
        trace[#trace + 1] = name .. i
        ops.yield()
      end
    end
    ops.wait_all({ops.spawn(worker, "a"), ops.spawn(worker, "b")})
    assert.are.same({"a1", "b1", "a2", "b2", "a3", "b3"}, trace)
  end)

  it("refuses to let a task wait for itself", function()
    local t
    t = ops.spawn(function() ops.sleep(0); return pcall(function() return t:wait() end) end)
    local _, ok, err = t:wait()
    assert.is_false(ok)
    assert.matches("cannot wait for itself", err)
  end)
end)

describe("ops.wait_all", function()
  it("collects every outcome and says whether all succeeded", function()
    local all_ok, outs = ops.wait_all({
      ops.spawn(function() return 1 end),
      ops.spawn(function() error("two", 0) end),
      ops.spawn(function() ops.sleep(0.01); return 3, 4 end),
    })
    assert.is_false(all_ok)
    assert.is_true(outs[1].ok)
    assert.are.equal(1, outs[1][1])
    assert.is_false(outs[2].ok)
    assert.are.equal("two", outs[2].err)
    assert.are.same({3, 4}, {outs[3][1], outs[3][2]})
  end)
end)

describe("task:cancel", function()
  it("stops a waiting task and runs its <close> variables", function()
    local closed = false
    local t = ops.spawn(function()
      local guard <close> = setmetatable({}, {__close = function() closed = true end})
      ops.sleep(60)
      return "never"
    end)
    ops.sleep(0.01)
    assert.are.equal("waiting", t:status())
    assert.is_true(t:cancel())
    assert.is_true(closed)
    assert.are.equal("cancelled", t:status())
    local ok, why = t:wait()
    assert.is_false(ok)
    assert.are.equal("cancelled", why)
    assert.is_false(t:cancel()) -- already over
  end)

  it("lets a <close> handler cancel a task that is cancelling it, once", function()
    local a, b
    local closed = 0
    a = ops.spawn(function()
      local g <close> = setmetatable({}, {__close = function() closed = closed + 1; b:cancel() end})
      ops.sleep(60)
    end)
    b = ops.spawn(function()
      local g <close> = setmetatable({}, {__close = function() closed = closed + 1; a:cancel() end})
      ops.sleep(60)
    end)
    ops.sleep(0.01)
    assert.is_true(a:cancel())
    assert.are.equal(2, closed)
    assert.are.equal("cancelled", a:status())
    assert.are.equal("cancelled", b:status())
  end)

  it("cancels a task that has not started yet", function()
    local ran = false
    local t = ops.spawn(function() ran = true end)
    t:cancel()
    ops.sleep(0.01)
    assert.is_false(ran)
  end)

  it("wakes the tasks that were waiting for the cancelled one", function()
    local t = ops.spawn(function() ops.sleep(60) end)
    local w = ops.spawn(function() return t:wait() end)
    ops.sleep(0.01)
    t:cancel()
    local _, ok, why = w:wait()
    assert.is_false(ok)
    assert.are.equal("cancelled", why)
  end)

  it("kills the child process a cancelled task was waiting for", function()
    local pidfile = os.tmpname()
    local t = ops.spawn(function()
      return ops.proc.run({"sh", "-c", "echo $$ > " .. pidfile .. "; exec sleep 60"})
    end)
    local pid
    for _ = 1, 200 do
      pid = tonumber(h.read(pidfile) or "")
      if pid then break end
      ops.sleep(0.01)
    end
    assert.is_number(pid)
    assert.is_true(h.alive(pid))
    t:cancel()
    for _ = 1, 500 do
      if not h.alive(pid) then break end
      ops.sleep(0.01)
    end
    assert.is_false(h.alive(pid))
    os.remove(pidfile)
  end)
end)

describe("waiting outside a task", function()
  it("raises a clear error from a line callback", function()
    local msg
    ops.proc.run({"echo", "x"}, {stdout = function()
      local ok, err = pcall(ops.sleep, 0.01)
      msg = not ok and err
    end})
    assert.matches("must be called from a task", msg)
  end)

  it("raises a clear error in a plain coroutine", function()
    local co = coroutine.create(function() ops.sleep(0.01) end)
    local ok, err = coroutine.resume(co)
    assert.is_false(ok)
    assert.matches("ops.sleep must be called from a task", err)
  end)
end)

describe("ops.core.sched suspend and wake", function()
  it("suspends a task until another wakes it with values", function()
    local sched = require "ops.core.sched"
    local t = ops.spawn(function() return sched.suspend() end)
    ops.sleep(0.01)
    assert.is_true(sched.wake(t, "a", 2))
    assert.are.same({true, "a", 2}, {t:wait()})
    assert.is_false(sched.wake(t)) -- not suspended any more
  end)
end)
