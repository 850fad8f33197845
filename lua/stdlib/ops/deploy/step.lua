-- ops.deploy.step: what a driver and a hook see of one step (docs/drivers.md).
local fs = require "ops.fs"
local proc = require "ops.proc"
local log = require "ops.log"
local failure = require "ops.deploy.failure"

local Step = {}
Step.__index = Step

local TAIL_LINES = 60
local TAIL_LINE_BYTES = 2048 -- of each line kept in the tail (the log gets the whole line)

--- Step.new(fields) -> step ; fields: id, env, tool, folder, dir, env_dir, repo, workdir,
--- dry_run, vars, outputs, exports (run-wide variables), private_dir, timeout, out (dry-run writer)
function Step.new(f)
  local s = setmetatable(f, Step)
  s.vars = s.vars or {}
  s.outputs = s.outputs or {}
  s.exports = s.exports or {}
  s.commands = {}
  s.tail = {}
  s.log = log.with({step = s.id})
  return s
end

local function quote(arg)
  if arg == "" then return "''" end
  if arg:match("^[%w_@%%+=:,./%-]+$") then return arg end
  return "'" .. arg:gsub("'", "'\\''") .. "'"
end

--- step.command_line(argv) -> a shell-quoted rendering, for people (never run by a shell)
function Step.command_line(argv)
  local parts = {}
  for i, a in ipairs(argv) do parts[i] = quote(tostring(a)) end
  return table.concat(parts, " ")
end

function Step:remember(line)
  local t = self.tail
  line = log.redact(line) -- before the cut: a secret cut in two would match no mask
  if #line > TAIL_LINE_BYTES then -- a minified JSON or a base64 blob: the store keeps its start
    local cut = TAIL_LINE_BYTES
    while cut > 0 and line:byte(cut + 1) >= 0x80 and line:byte(cut + 1) < 0xC0 do cut = cut - 1 end -- whole UTF-8 characters
    line = string.format("%s … (%d more bytes)", line:sub(1, cut), #line - cut)
  end
  t[#t + 1] = line
  if #t > TAIL_LINES then table.remove(t, 1) end
end

--- step:output_line(line, stream) : one line of a command's output, to the log and the tail
function Step:output_line(line, stream)
  -- terminal colours (terraform, helm) would litter the log and the stored tail
  if line:find("\27", 1, true) then line = line:gsub("\27%[[%d;?]*[%a]", "") end
  self:remember(line)
  if stream == "stderr" then
    self.log.info(line, {stream = "stderr"})
  else
    self.log.info(line)
  end
end

-- A command's environment: the step's exports, its variables, then the command's own,
-- each winning over the one before; as layers proc.spawn merges (no table per command).
local function env_layers(self, extra)
  return {self.exports, self.vars, extra}
end

local function env_for(self, extra)
  local env = {}
  for _, layer in ipairs(env_layers(self, extra)) do
    for k, v in pairs(layer) do env[k] = v end
  end
  return env
end

--- step:run(argv, opts) -> result (see docs/drivers.md)
function Step:run(argv, opts)
  opts = opts or {}
  local cwd = opts.cwd or self.dir
  self.commands[#self.commands + 1] = argv
  if self.dry_run then
    local env = env_for(self, opts.env)
    local out = self.out or io.stdout
    out:write(log.redact(string.format("[%s] would run: %s\n    in: %s\n", self.id, Step.command_line(argv), cwd)))
    local names = {}
    for k in pairs(self.vars) do names[#names + 1] = k end
    for k in pairs(opts.env or {}) do if self.vars[k] == nil then names[#names + 1] = k end end
    table.sort(names)
    for _, k in ipairs(names) do
      out:write(log.redact(string.format("    env: %s=%s\n", k, tostring(env[k]))))
    end
    out:flush()
    return {ok = true, code = 0, stdout = "", stderr = "", dry_run = true, duration = 0}
  end
  if log.enabled("debug") then self.log.debug("running " .. Step.command_line(argv), {cwd = cwd}) end
  local stdout = opts.quiet and "capture" or function(line) self:output_line(line, "stdout") end
  local res, err, code = proc.run(argv, {
    cwd = cwd, env = env_layers(self, opts.env), stdin = opts.stdin, timeout = opts.timeout or self.timeout,
    stdout = stdout, stderr = function(line) self:output_line(line, "stderr") end,
    -- it exited, but what it started in the background still holds its output: say why we wait
    on_linger = function()
      self.log.warn(string.format("%s has exited, but a process it started still holds its output open: the "
        .. "step waits for that process to end (give it its own output: `cmd >/dev/null 2>&1 &`)",
        self:shown(Step.command_line(argv)):sub(1, 200)))
    end,
  })
  if not res then
    if code == "ENOENT" and err:find("command not found", 1, true) then
      self:fail(string.format("%s: command not found (is %s installed and on PATH?)", argv[1], argv[1]))
    end
    self:fail(err)
  end
  self.last_code = res.code
  return res
end

local function describe_end(res)
  if res.timed_out then return "timed out" end
  if res.signal then return "was killed by " .. res.signal end
  return "exited with " .. tostring(res.code)
end

--- step:check(argv, opts) -> result, failing the step unless the command succeeded
function Step:check(argv, opts)
  local res = self:run(argv, opts)
  if not res.ok then
    local tail = {}
    for i = math.max(1, #self.tail - 4), #self.tail do tail[#tail + 1] = self.tail[i] end
    local name = argv[1] .. ((argv[2] and not argv[2]:match("^%-")) and (" " .. argv[2]) or "")
    self:fail(string.format("%s failed: it %s%s", name, describe_end(res),
      #tail > 0 and (":\n    " .. table.concat(tail, "\n    ")) or ""))
  end
  return res
end

--- step:fail(message) : fails the step with a message for the user
function Step:fail(message)
  failure.raise(message)
end

--- step:shown(text) -> a path, or a message holding paths, as the user should read it: a
--- path in the run's working copy as the repo has it (ENV/FOLDER/...: the copy is gone when
--- the message is read), any other as it is
function Step:shown(text)
  local root = self.workdir and self.workdir .. "/"
  if not root then return text end
  local out, at = {}, 1
  while true do
    local i, j = text:find(root, at, true)
    if not i then break end
    out[#out + 1] = text:sub(at, i - 1)
    at = j + 1
  end
  out[#out + 1] = text:sub(at)
  return table.concat(out)
end

--- step:path(rel [, key]) -> absolute path inside step.dir (no .. or symlink escapes); else
--- fails the step naming rel, and key and the config file when given (the setting rel came from)
function Step:path(rel, key)
  local p, err, code = fs.within(self.dir, rel) -- (a setting's NUL byte was refused when it was read)
  if p then return p end
  err = code == "EOUTSIDE" and "leads outside " .. self.id or err
  if key then
    self:fail(string.format("%s: %s %s (%s)", key, rel, err, self.config_file))
  end
  self:fail(string.format("%s: %s %s", self.id, rel, err))
end

--- step:private_file(name, content) -> path of a 0600 file removed with the run
function Step:private_file(name, content)
  if type(name) ~= "string" or name == "" or name:find("/", 1, true) or name:sub(1, 1) == "." then
    error("step:private_file: name must be a plain file name", 2)
  end
  local path = fs.join(self.private_dir, name)
  local ok, err = fs.mkdir_p(self.private_dir, {mode = "0700"})
  if ok then ok, err = fs.write_atomic(path, content, "0600") end
  if not ok then self:fail("cannot write " .. path .. ": " .. err) end
  return path
end

--- step:secret(value) -> value, masked in all output from now on
function Step:secret(value)
  return log.secret(value)
end

--- step:export(name, value) : a variable for this step and every later step of the run
function Step:export(name, value)
  self.exports[name] = tostring(value)
end

return Step
