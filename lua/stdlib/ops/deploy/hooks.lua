-- ops.deploy.hooks: the scripts in a tool folder's bitops.before-deploy.d/,
-- bitops.after-deploy.d/ and bitops.on-failure.d/, run in name order.
--   NAME.sh   run with bash, in the tool folder, with the step's variables
--   NAME.lua  run inside opsrun, as function(step) (it may use ops.* and wait)
--   other     run directly; it must be executable
local fs = require "ops.fs"

local hooks = {}

hooks.DIRS = {
  before = "bitops.before-deploy.d",
  after = "bitops.after-deploy.d",
  failure = "bitops.on-failure.d",
}

--- hooks.list(step, phase) -> sorted file names
function hooks.list(step, phase)
  local dir = fs.join(step.dir, hooks.DIRS[phase])
  if fs.type(dir) ~= "directory" then return {}, dir end
  local names = {}
  for _, name in ipairs(assert(fs.list(dir))) do
    if fs.type(fs.join(dir, name)) == "file" and name:sub(1, 1) ~= "." then names[#names + 1] = name end
  end
  return names, dir
end

--- hooks.run(step, phase) : every hook of the phase; the first that fails fails the step
function hooks.run(step, phase)
  local names, dir = hooks.list(step, phase)
  for _, name in ipairs(names) do
    local path = fs.join(dir, name)
    local label = hooks.DIRS[phase] .. "/" .. name
    step.log.info("hook " .. label)
    if step.dry_run and name:match("%.lua$") then
      local out = step.out or io.stdout
      out:write(string.format("[%s] would run the Lua hook %s\n", step.id, label))
    elseif name:match("%.lua$") then
      -- named as messages name the step's files (STEP/...: env/folder/... for a BitOps
      -- step), not by the run's working copy
      local text, rerr = fs.read(path)
      if not text then step:fail("hook " .. label .. " cannot be read: " .. rerr) end
      local chunk, err = load(text, "@" .. step.id .. "/" .. label, "t")
      if not chunk then step:fail("hook " .. label .. " cannot be loaded: " .. err) end
      local ok, herr = pcall(chunk, step)
      if not ok then
        local failure = require "ops.deploy.failure"
        local why = failure.message(herr)
        if type(herr) ~= "string" and type(herr) ~= "number" and not failure.is(herr)
            and not (getmetatable(herr) or {}).__tostring then
          why = "it raised a " .. type(herr) .. " with no message" -- error({}): no address of ours to show
        end
        step:fail("hook " .. label .. " failed: " .. why)
      end
    else
      local argv
      if name:match("%.sh$") then
        argv = {"bash", path}
      elseif fs.is_executable(path) then
        argv = {path}
      else
        step:fail(string.format("hook %s is not executable (chmod +x it, or name it .sh to run it with bash)", label))
      end
      local res = step:run(argv, {cwd = step.dir})
      if not res.ok then
        step:fail(string.format("hook %s %s", label,
          res.timed_out and "timed out" or res.signal and ("was killed by " .. res.signal)
          or ("exited with " .. tostring(res.code))))
      end
    end
  end
end

return hooks
