-- helm-set-from-terraform.lua: Terraform outputs become `helm upgrade --set` items.
--
-- Install: copy to <ops repo>/.opsrun/tools/helm.lua (or merge it into the one you have).
-- It applies to every helm step of the repo. In an environment whose terraform step runs
-- before its helm step (the default order), each scalar output `name` of
-- `terraform output -json` is passed as `--set terraform.name=value`, after the items of
-- cli.set (for helm, the last --set of a key wins, so an output overrides cli.set).
-- The outputs come from step.outputs.terraform, filled by this run's terraform step; when
-- that step is not part of the run (--only helm), from the TF_OUTPUT_* variables the step
-- was given. Lists and maps are left out: pass those with a values file instead.
local base = ops.builtin("tools.helm")
local M = setmetatable({}, {__index = base})

-- the key under which outputs appear in the chart's values: .Values.terraform.<name>
M.values_key = "terraform"

-- helm's --set splits on commas and reads backslashes: escape both
local function set_value(v)
  return (tostring(v):gsub("\\", "\\\\"):gsub(",", "\\,"))
end

--- M:terraform_outputs(step) -> {name = scalar value}
function M:terraform_outputs(step)
  local found = {}
  local tf = step.outputs.terraform
  if type(tf) == "table" then
    for name, value in pairs(tf) do
      if type(value) ~= "table" then found[name] = value end
    end
    return found
  end
  for _, vars in ipairs({step.exports or {}, step.vars}) do
    for var, value in pairs(vars) do
      local name = var:match("^TF_OUTPUT_(.+)$")
      -- only the scalars: a JSON list or map starts with [ or {
      if name and not value:match("^%s*[%[{]") then found[name:lower()] = value end
    end
  end
  return found
end

function M:upgrade(step, chart)
  local outputs = self:terraform_outputs(step)
  local names = {}
  for name in pairs(outputs) do names[#names + 1] = name end
  if #names == 0 then return base.upgrade(self, step, chart) end
  table.sort(names)
  local set = {}
  for i, item in ipairs(step.config.cli.set or {}) do set[i] = item end
  for _, name in ipairs(names) do
    set[#set + 1] = string.format("%s.%s=%s", self.values_key, name, set_value(outputs[name]))
  end
  step.log.info(string.format("helm: %d terraform output(s) as --set %s.*", #names, self.values_key))
  -- the built-in upgrade reads cli.set; give it the longer list for this one call
  local saved = step.config.cli.set
  step.config.cli.set = set
  local ok, err = pcall(base.upgrade, self, step, chart)
  step.config.cli.set = saved
  if not ok then error(err, 0) end
end

return M
