-- ops.proc: programs run without a shell, many at once, and always reaped.
local h = require "helpers"

describe("ops.proc.run", function()
  it("captures stdout, stderr and the exit code", function()
    local r = ops.proc.run({"sh", "-c", "echo out; echo err >&2; exit 3"})
    assert.are.equal("out\n", r.stdout)
    assert.are.equal("err\n", r.stderr)
    assert.are.equal(3, r.code)
    assert.is_false(r.ok)
    assert.is_false(r.timed_out)
    assert.is_nil(r.signal)
    assert.is_number(r.duration)
  end)

  it("passes arguments as they are, with no shell in between", function()
    local r = ops.proc.run({"printf", "%s|", "a b", "$HOME", "`id`", "; rm -rf /"})
    assert.are.equal("a b|$HOME|`id`|; rm -rf /|", r.stdout)
  end)

  it("says which program is missing", function()
    local r, err, code = ops.proc.run({"no-such-program-xyz", "arg"})
    assert.is_nil(r)
    assert.are.equal("no-such-program-xyz: command not found", err)
    assert.are.equal("ENOENT", code)
  end)

  it("refuses a file that is not executable", function()
    local dir = h.tmpdir()
    h.write(dir .. "/script.sh", "#!/bin/sh\necho hi\n", "0644")
    local r, err, code = ops.proc.run({dir .. "/script.sh"})
    assert.is_nil(r)
    assert.matches("permission denied", err)
    assert.are.equal("EACCES", code)
    h.rmtree(dir)
  end)

  it("says when a file is not a program it can run", function()
    local dir = h.tmpdir()
    h.write(dir .. "/notes.txt", "just some words\n", "0755") -- executable, but no #! line
    local r, err, code = ops.proc.run({dir .. "/notes.txt"})
    assert.is_nil(r)
    assert.are.equal(dir .. "/notes.txt: cannot run: Exec format error", err)
    assert.are.equal("ENOEXEC", code)
    -- the child that could not exec was reaped: no zombie of ours is left
    local me = tostring(ops.sys.pid())
    for _, name in ipairs(ops.fs.list("/proc")) do
      local stat = name:match("^%d+$") and io.open("/proc/" .. name .. "/stat")
      if stat then
        local line = stat:read("l") or ""
        stat:close()
        local state, ppid = line:match("%) (%S) (%d+)")
        assert.is_false(ppid == me and state == "Z", "zombie child " .. name)
      end
    end
    h.rmtree(dir)
  end)

  it("hands its own stdin, stdout and stderr to a child that inherits them", function()
    local dir = h.tmpdir()
    h.write(dir .. "/s.lua", [[
      local r = ops.proc.run({"sh", "-c", "read line; echo \"out:$line\"; echo err >&2"},
        {stdin = "inherit", stdout = "inherit", stderr = "inherit"})
      io.write("code ", r.code, " captured ", tostring(r.stdout), " ", tostring(r.stderr), "\n")
    ]])
    local r = h.run_opsrun({dir .. "/s.lua"}, {stdin = "typed\n"})
    assert.are.equal("out:typed\ncode 0 captured nil nil\n", r.stdout)
    assert.are.equal("err\n", r.stderr)
    h.rmtree(dir)
  end)

  it("starts the program in a session of its own with no signal ignored or blocked", function()
    -- opsrun ignores SIGPIPE and catches SIGCHLD; the program must not inherit either
    local mine = io.open("/proc/self/status"):read("a")
    local ign = tonumber(mine:match("SigIgn:%s*(%x+)"), 16)
    assert.are_not.equal(0, ign & (1 << 12), "opsrun itself ignores SIGPIPE (signal 13)")
    local r = ops.proc.run({"cat", "/proc/self/status", "/proc/self/stat"})
    assert.is_true(r.ok)
    assert.are.equal("0000000000000000", r.stdout:match("SigIgn:%s*(%x+)"))
    assert.are.equal("0000000000000000", r.stdout:match("SigBlk:%s*(%x+)"))
    local pid, session = r.stdout:match("\n(%d+) %(cat%) %S %d+ %d+ (%d+)")
    assert.is_not_nil(pid)
    assert.are.equal(pid, session)
  end)

  it("does not pass on a signal ignored by whoever started opsrun (nohup, a shell's background job)", function()
    local dir = h.tmpdir()
    h.write(dir .. "/s.lua", [[
      local mine = io.open("/proc/self/status"):read("a")
      local r = assert(ops.proc.run({"cat", "/proc/self/status"}))
      io.write(mine:match("SigIgn:%s*(%x+)"), " ", r.stdout:match("SigIgn:%s*(%x+)"), "\n")
    ]])
    -- sh ignores SIGHUP, SIGQUIT and SIGUSR2 (signals 1, 3 and 12), and opsrun inherits that
    local r = assert(ops.proc.run({"sh", "-c", 'trap "" HUP QUIT USR2; exec "$0" "$1"', h.opsrun, dir .. "/s.lua"}))
    assert.are.equal(0, r.code, r.stderr)
    local mine, child = r.stdout:match("^(%x+) (%x+)\n$")
    local these = 1 << 0 | 1 << 2 | 1 << 11
    assert.are.equal(these, tonumber(mine, 16) & these)
    assert.are.equal("0000000000000000", child)
    h.rmtree(dir)
  end)

  it("refuses a working directory that does not exist or is not a directory, and runs nothing", function()
    local dir = h.tmpdir()
    local marker = dir .. "/ran"
    local file = dir .. "/file"
    assert(io.open(file, "w")):close()
    for _, cwd in ipairs({"/no/such/dir", file, file .. "/below"}) do
      -- a program found on PATH, one named by a path, and one that does not exist:
      -- the missing directory is what each is told
      for _, argv in ipairs({{"touch", marker}, {"/bin/sh", "-c", "touch " .. marker}, {"no-such-program-x"}}) do
        local r, err, code = ops.proc.run(argv, {cwd = cwd})
        assert.is_nil(r)
        assert.are.equal(argv[1] .. ": cannot run in " .. cwd .. ": no such directory", err)
        assert.are.equal("ENOENT", code)
      end
    end
    assert.is_nil(io.open(marker)) -- nothing ran
    -- a directory that exists: the missing program is what it is told
    local r, err = ops.proc.run({"no-such-program-x"}, {cwd = dir})
    assert.is_nil(r)
    assert.are.equal("no-such-program-x: command not found", err)
    h.rmtree(dir)
  end)

  it("says when it may not enter the working directory (not that the program is not executable)", function()
    local dir = h.tmpdir()
    local locked = dir .. "/locked"
    assert(ops.proc.run({"mkdir", "-m", "700", locked}))
    local script = string.format([[
      local _, err, code = require("ops").proc.run({"true"}, {cwd = %q})
      print(err, code)]], locked)
    local argv
    if require("ops.sys").uid() == 0 then
      -- root enters any folder: the attempt runs as nobody, who may look at it but not enter it
      assert(ops.proc.run({"chmod", "755", dir}))
      argv = {"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", h.opsrun, "-e", script}
    else
      assert(ops.proc.run({"chmod", "000", locked}))
      argv = {h.opsrun, "-e", script}
    end
    local r = assert(ops.proc.run(argv))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("true: cannot run in " .. locked .. ": Permission denied\tEACCES\n", r.stdout)
    ops.proc.run({"chmod", "700", locked})
    h.rmtree(dir)
  end)

  it("raises on misuse", function()
    assert.has_error(function() ops.proc.run({}) end)
    assert.has_error(function() ops.proc.run({"echo", {}}) end)
    assert.has_error(function() ops.proc.run({"echo"}, {stdout = "bogus"}) end)
    assert.has_error(function() ops.proc.run({"echo"}, {env = "x"}) end)
    assert.has_error(function() ops.proc.run({"echo"}, {capture_limit = -1}) end)
    assert.has_error(function() ops.proc.run({"echo"}, {capture_limit = 0 / 0}) end)
  end)

  it("runs in the given directory", function()
    local r = ops.proc.run({"pwd"}, {cwd = "/tmp"})
    assert.are.equal("/tmp\n", r.stdout)
  end)

  it("extends the environment, unsets with false, and replaces on request", function()
    ops.sys.setenv("OPSRUN_SPEC_KEEP", "kept")
    ops.sys.setenv("OPSRUN_SPEC_DROP", "dropped")
    local r = ops.proc.run({"sh", "-c", "echo $OPSRUN_SPEC_KEEP,$OPSRUN_SPEC_NEW,${OPSRUN_SPEC_DROP-unset}"},
      {env = {OPSRUN_SPEC_NEW = "new", OPSRUN_SPEC_DROP = false}})
    assert.are.equal("kept,new,unset\n", r.stdout)
    r = ops.proc.run({"/usr/bin/env"}, {env = {ONLY = "1"}, env_replace = true})
    assert.are.equal("ONLY=1\n", r.stdout)
  end)

  it("refuses a variable a child would not get as written: an empty name, '=' or NUL in a name, NUL in a value", function()
    local marker = os.tmpname()
    os.remove(marker)
    for _, c in ipairs({
      {{A = "x\0y"}, "opts.env.A contains a NUL byte"},
      {{["A\0B"] = "x"}, "opts.env: 'A' is not a variable name (empty, or with '=' or a NUL byte)"},
      {{["PATH=/tmp:"] = "x"}, "opts.env: 'PATH=/tmp:' is not a variable name (empty, or with '=' or a NUL byte)"},
      {{[""] = "x"}, "opts.env: '' is not a variable name (empty, or with '=' or a NUL byte)"},
      {{{A = "1"}, {["B=C"] = "2"}}, "opts.env: 'B=C' is not a variable name (empty, or with '=' or a NUL byte)"},
    }) do
      local ok, err = pcall(ops.proc.run, {"touch", marker}, {env = c[1]})
      assert.is_false(ok)
      assert.matches(c[2], err, 1, true)
    end
    assert.is_nil(io.open(marker)) -- nothing ran
  end)

  it("calls on_linger once when the child has exited but what it started still holds its output", function()
    local calls, lines = {}, {}
    local t0 = ops.time.monotonic()
    local r = ops.proc.run({"sh", "-c", "sleep 1 & echo started"}, {drain = 0.3,
      stdout = function(line) lines[#lines + 1] = line end,
      on_linger = function(pid) calls[#calls + 1] = {pid = pid, at = ops.time.monotonic() - t0} end})
    assert.are.equal(0, r.code)
    assert.are.same({"started"}, lines)          -- every line read: the run waited for the pipe
    assert.are.equal(1, #calls)
    assert.are.equal(r.pid, calls[1].pid)
    assert.is_true(calls[1].at >= 0.3, tostring(calls[1].at)) -- drain seconds after the exit, not before
    -- not when the output closes with the exit, nor with a timeout (which ends the group)
    local called = false
    r = ops.proc.run({"sh", "-c", "echo quick"}, {drain = 0.05, on_linger = function() called = true end})
    ops.sleep(0.1)
    r = ops.proc.run({"sh", "-c", "sleep 5 & echo x"}, {timeout = 0.5, drain = 0.1, on_linger = function() called = true end})
    assert.is_true(r.timed_out)
    assert.is_false(called)
    -- an error in it is the run's, and stops the group
    local ok, err = pcall(ops.proc.run, {"sh", "-c", "sleep 5 & echo y"}, {drain = 0.1, on_linger = function() error("no") end})
    assert.is_false(ok)
    assert.matches("no", err, 1, true)
    ok, err = pcall(ops.proc.run, {"true"}, {on_linger = 5})
    assert.is_false(ok)
    assert.matches("opts.on_linger must be a function", err, 1, true)
  end)

  it("gives a variable the table sets once, with the table's value, among many", function()
    ops.sys.setenv("OPSRUN_SPEC_SAME", "inherited")
    ops.sys.setenv("OPSRUN_SPEC_SAME_LONGER", "inherited too")
    local env = {OPSRUN_SPEC_SAME = "from the table", OPSRUN_SPEC_NUM = 42}
    for i = 1, 300 do env["OPSRUN_SPEC_V" .. i] = "v" .. i end -- more than fit on the C stack
    local r = ops.proc.run({"/usr/bin/env"}, {env = env})
    local seen, count = {}, 0
    for line in r.stdout:gmatch("[^\n]+") do
      local k, v = line:match("^([^=]+)=(.*)$")
      if k and k:match("^OPSRUN_SPEC_") then
        assert.is_nil(seen[k], k .. " twice")
        seen[k] = v
        count = count + 1
      end
    end
    assert.are.equal("from the table", seen.OPSRUN_SPEC_SAME)
    assert.are.equal("inherited too", seen.OPSRUN_SPEC_SAME_LONGER)
    assert.are.equal("42", seen.OPSRUN_SPEC_NUM)
    assert.are.equal("v1", seen.OPSRUN_SPEC_V1)
    assert.are.equal("v300", seen.OPSRUN_SPEC_V300)
    r = ops.proc.run({"printf", "%s-%s", 7, 2.5})
    assert.are.equal("7-2.5", r.stdout)
    -- layers: each table wins over the ones before it, false unsets, an inherited one stays
    r = ops.proc.run({"/usr/bin/env"}, {env = {
      {OPSRUN_SPEC_A = "1", OPSRUN_SPEC_B = "1", OPSRUN_SPEC_C = "1"},
      {OPSRUN_SPEC_B = "2", OPSRUN_SPEC_C = "2", OPSRUN_SPEC_SAME = false},
      {OPSRUN_SPEC_C = "3"},
    }})
    assert.matches("\nOPSRUN_SPEC_A=1\n", "\n" .. r.stdout)
    assert.matches("\nOPSRUN_SPEC_B=2\n", "\n" .. r.stdout)
    assert.matches("\nOPSRUN_SPEC_C=3\n", "\n" .. r.stdout)
    assert.matches("\nOPSRUN_SPEC_SAME_LONGER=inherited too\n", "\n" .. r.stdout)
    assert.is_nil(r.stdout:find("OPSRUN_SPEC_SAME=", 1, true))
    local _, n = r.stdout:gsub("OPSRUN_SPEC_C=", "")
    assert.are.equal(1, n)
    -- the program is looked up in the PATH the child gets: a layer's, the last one's
    local dir = os.tmpname()
    os.remove(dir)
    assert(ops.fs.mkdir(dir))
    assert(ops.fs.write(dir .. "/opsrun-spec-prog", "#!/bin/sh\necho \"found $PATH\"\n", "0755"))
    r = ops.proc.run({"opsrun-spec-prog"}, {env = {{PATH = "/nonexistent"}, {PATH = dir}}})
    assert.are.equal("found " .. dir .. "\n", r and r.stdout)
    local _, err, code = ops.proc.run({"opsrun-spec-prog"}, {env = {{PATH = dir}, {PATH = "/nonexistent"}}})
    assert.are.equal("ENOENT", code, err)
    -- unset: looked up in the default PATH, /usr/local/bin:/usr/bin:/bin (env is in
    -- /usr/bin), which the child does not get
    r = ops.proc.run({"env"}, {env = {PATH = false}})
    assert.is_truthy(r and r.ok)
    assert.is_nil(("\n" .. r.stdout):find("\nPATH=", 1, true))
    ops.fs.remove(dir, {recursive = true})
    assert.has_error(function() ops.proc.run({"true"}, {env = {[1] = "x"}}) end)
    assert.has_error(function() ops.proc.run({"true"}, {env = {{A = "1"}, B = "2"}}) end)
    assert.has_error(function() ops.proc.run({"true"}, {env = {{A = "1"}, "B=2"}}) end)
    assert.has_error(function() ops.proc.run({"true"}, {env = {X = true}}) end)
  end)

  it("feeds stdin from a string or a file", function()
    local r = ops.proc.run({"cat"}, {stdin = "line1\nline2"})
    assert.are.equal("line1\nline2", r.stdout)
    local dir = h.tmpdir()
    h.write(dir .. "/in", "from file\n")
    r = ops.proc.run({"cat"}, {stdin = {path = dir .. "/in"}})
    assert.are.equal("from file\n", r.stdout)
    r = ops.proc.run({"cat"}) -- no stdin: /dev/null, so cat ends at once
    assert.are.equal("", r.stdout)
    h.rmtree(dir)
  end)

  it("writes a big stdin without deadlocking against a big stdout", function()
    local big = string.rep("0123456789abcdef", 64 * 1024) -- 1 MiB
    local r = ops.proc.run({"cat"}, {stdin = big, capture_limit = 2 * #big})
    assert.are.equal(#big, #r.stdout)
  end)

  it("sends output to a file, or merges stderr into stdout", function()
    local dir = h.tmpdir()
    local r = ops.proc.run({"sh", "-c", "echo one; echo two >&2"}, {stdout = {path = dir .. "/out"}, stderr = "ignore"})
    assert.is_true(r.ok)
    assert.is_nil(r.stdout)
    assert.are.equal("one\n", h.read(dir .. "/out"))
    ops.proc.run({"echo", "three"}, {stdout = {path = dir .. "/out", append = true}})
    assert.are.equal("one\nthree\n", h.read(dir .. "/out"))
    r = ops.proc.run({"sh", "-c", "echo a; sleep 0.01; echo b >&2; sleep 0.01; echo c"}, {stderr = "stdout"})
    assert.are.equal("a\nb\nc\n", r.stdout)
    assert.is_nil(r.stderr)
    h.rmtree(dir)
  end)

  it("keeps only the tail of output over the capture limit and says so", function()
    local r = ops.proc.run({"seq", "1", "100000"}, {capture_limit = 100})
    assert.are.equal(100, #r.stdout)
    assert.is_true(r.stdout_truncated)
    assert.matches("99999\n100000\n$", r.stdout)
  end)

  it("streams lines to a callback as they are produced, in order", function()
    local lines = {}
    local r = ops.proc.run({"sh", "-c", "printf 'a\\nb\\r\\n'; echo err >&2; printf 'no-newline'"}, {
      stdout = function(line, stream) lines[#lines + 1] = stream .. ":" .. line end,
      stderr = function(line, stream) lines[#lines + 1] = stream .. ":" .. line end,
    })
    assert.is_true(r.ok)
    table.sort(lines)
    assert.are.same({"stderr:err", "stdout:a", "stdout:b", "stdout:no-newline"}, lines)
  end)

  it("delivers a line before the program ends", function()
    -- the child waits for a file the callback creates: it only ends if the line came early
    local dir = h.tmpdir()
    local r = ops.proc.run({"sh", "-c", "echo ready; while [ ! -e " .. dir .. "/go ]; do sleep 0.01; done; echo done"}, {
      timeout = 20,
      stdout = function(line) if line == "ready" then h.write(dir .. "/go", "") end end,
    })
    assert.is_false(r.timed_out)
    assert.is_true(r.ok)
    h.rmtree(dir)
  end)

  it("raises the error of a failing line callback and stops the program", function()
    local ok, err = pcall(ops.proc.run, {"sh", "-c", "echo x; exec sleep 60"}, {
      stdout = function() error("callback broke") end,
    })
    assert.is_false(ok)
    assert.matches("callback broke", err)
  end)
end)

describe("processes run at once", function()
  it("lets two programs talk through a FIFO, which only works if both run together", function()
    local dir = h.tmpdir()
    local fifo = dir .. "/fifo"
    assert(ops.proc.run({"mkfifo", fifo}).ok)
    local writer = ops.spawn(ops.proc.run, {"sh", "-c", "echo ping > " .. fifo}, {timeout = 20})
    local reader = ops.spawn(ops.proc.run, {"cat", fifo}, {timeout = 20})
    local _, w = writer:wait()
    local _, r = reader:wait()
    assert.is_false(w.timed_out)
    assert.is_false(r.timed_out)
    assert.are.equal("ping\n", r.stdout)
    h.rmtree(dir)
  end)

  it("reaps 64 concurrent children", function()
    local tasks = {}
    for i = 1, 64 do
      tasks[i] = ops.spawn(ops.proc.run, {"sh", "-c", "sleep 0.05; exit " .. (i % 7)})
    end
    local all_ok, outs = ops.wait_all(tasks)
    assert.is_true(all_ok)
    for i = 1, 64 do assert.are.equal(i % 7, outs[i][1].code) end
    assert.are.same({}, h.children())
  end)
end)

describe("timeouts", function()
  it("stops a slow program and says it timed out", function()
    local r = ops.proc.run({"sleep", "60"}, {timeout = 0.1})
    assert.is_true(r.timed_out)
    assert.are.equal("SIGTERM", r.signal)
    assert.is_false(r.ok)
  end)

  it("kills a program that ignores SIGTERM after the grace period", function()
    local r = ops.proc.run({"sh", "-c", "trap '' TERM; echo started; while :; do sleep 0.05; done"},
      {timeout = 0.2, grace = 0.2})
    assert.is_true(r.timed_out)
    assert.are.equal("SIGKILL", r.signal)
    assert.are.equal("started\n", r.stdout)
  end)

  it("returns although a grandchild that ignores SIGTERM holds stdout open", function()
    local dir = h.tmpdir()
    local r = ops.proc.run({"sh", "-c",
      "(trap '' TERM; echo $$ > " .. dir .. "/gc; exec sleep 300) & trap '' TERM; sleep 300"},
      {timeout = 0.2, grace = 0.2, drain = 0.5})
    assert.is_true(r.timed_out)
    local gc
    for _ = 1, 100 do
      gc = tonumber(h.read(dir .. "/gc") or "")
      if gc then break end
      ops.sleep(0.01)
    end
    for _ = 1, 200 do
      if not h.alive(gc) then break end
      ops.sleep(0.01)
    end
    assert.is_false(h.alive(gc))
    h.rmtree(dir)
  end)

  it("returns when the child exits but a backgrounded grandchild keeps the pipe", function()
    local r = ops.proc.run({"sh", "-c", "sh -c 'trap \"\" TERM; sleep 300' & echo bye"},
      {timeout = 0.3, grace = 0.2, drain = 0.5})
    assert.are.equal("bye\n", r.stdout)
    assert.are.equal(0, r.code)
    assert.is_true(r.timed_out)
  end)
end)

describe("proc.spawn", function()
  it("gives a handle to wait for and kill", function()
    local p = assert(ops.proc.spawn({"sleep", "60"}))
    assert.is_number(p.pid)
    assert.is_true(h.alive(p.pid))
    assert.is_true(p:kill("SIGKILL"))
    local r = p:wait()
    assert.are.equal("SIGKILL", r.signal)
    assert.are.same(r.signal, p:wait().signal) -- the result stays available
  end)
end)
