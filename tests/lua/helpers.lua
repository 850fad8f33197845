-- Shared by the specs: the opsrun binary under test, temp dirs, small file helpers.
local helpers = {}

helpers.opsrun = assert(os.getenv("OPSRUN"), "OPSRUN: the opsrun binary under test")
helpers.source = os.getenv("OPSRUN_SOURCE") or "."

--- Runs the opsrun under test with args; returns the proc result.
function helpers.run_opsrun(args, opts)
  local argv = {helpers.opsrun}
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  local res, err = ops.proc.run(argv, opts)
  assert(res, err)
  return res
end

function helpers.tmpdir()
  local res = assert(ops.proc.run({"mktemp", "-d", "/tmp/opsrun-spec-XXXXXX"}))
  return (res.stdout:gsub("%s+$", ""))
end

function helpers.rmtree(dir)
  assert(dir:match("^/tmp/opsrun%-spec%-"), "refusing to remove " .. dir)
  ops.proc.run({"rm", "-rf", dir})
end

function helpers.write(path, data, mode)
  local f = assert(io.open(path, "wb"))
  f:write(data)
  f:close()
  if mode then ops.proc.run({"chmod", mode, path}) end
end

function helpers.read(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local d = f:read("a")
  f:close()
  return d
end

--- true while a process with this pid exists (and is not a zombie)
function helpers.alive(pid)
  local stat = helpers.read("/proc/" .. pid .. "/stat")
  if not stat then return false end
  local state = stat:match("^%d+ %b() (%a)")
  return state ~= nil and state ~= "Z"
end

--- pids of our own live children
function helpers.children()
  local pid = ops.sys.pid()
  local list = helpers.read("/proc/" .. pid .. "/task/" .. pid .. "/children") or ""
  local out = {}
  for p in list:gmatch("%d+") do out[#out + 1] = tonumber(p) end
  return out
end

return helpers
