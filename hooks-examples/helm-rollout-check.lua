-- helm-rollout-check.lua: after each `helm upgrade`, wait for the release's Deployments
-- and StatefulSets to be rolled out (`kubectl rollout status`), and roll the release back
-- to its previous revision when they are not.
--
-- Install: copy to <ops repo>/.opsrun/tools/helm.lua (to combine it with
-- helm-set-from-terraform.lua, put both upgrade functions in one file, this one calling
-- the other's). Needs kubectl on PATH. It uses the same kubeconfig and namespace as helm.
-- The workloads are found by the label Helm charts set, app.kubernetes.io/instance=<release>;
-- set HELM_ROLLOUT_SELECTOR to use another selector. The wait is cli.timeout (500s by default).
--
-- Why the explicit rollback: `helm upgrade` itself succeeded, so the newest revision is
-- "deployed" and the built-in recovery (which undoes failed upgrades) sees nothing to undo.
local base = ops.builtin("tools.helm")
local M = setmetatable({}, {__index = base})

local function kubectl(chart, ...)
  local argv = {"kubectl", ...}
  argv[#argv + 1] = "--namespace"
  argv[#argv + 1] = chart.namespace
  if chart.kubeconfig then
    argv[#argv + 1] = "--kubeconfig"
    argv[#argv + 1] = chart.kubeconfig
  end
  return argv
end

--- M:rollout(step, chart): fails the step unless every workload of the release is rolled out
function M:rollout(step, chart)
  local selector = step.vars.HELM_ROLLOUT_SELECTOR or os.getenv("HELM_ROLLOUT_SELECTOR")
    or ("app.kubernetes.io/instance=" .. chart.release)
  local found = step:check(kubectl(chart, "get", "deployments,statefulsets", "-l", selector, "-o", "name"),
    {quiet = true})
  local timeout = step.config.cli.timeout or "500s"
  local names = {}
  for name in (found.stdout or ""):gmatch("%S+") do names[#names + 1] = name end
  if step.dry_run then names = {"<each deployment/statefulset matching " .. selector .. ">"} end
  for _, name in ipairs(names) do
    local r = step:run(kubectl(chart, "rollout", "status", name, "--timeout", timeout))
    if not r.ok then
      step.log.error(string.format("%s of release %s is not rolled out: rolling the release back", name, chart.release))
      -- revision 0 is helm's "the previous one"; a first install has none and stays as it is
      local argv = {"helm", "rollback", chart.release, "0", "--namespace", chart.namespace, "--timeout", timeout}
      if chart.kubeconfig then
        argv[#argv + 1] = "--kubeconfig"
        argv[#argv + 1] = chart.kubeconfig
      end
      local rb = step:run(argv)
      if not rb.ok then step.log.error("helm rollback of " .. chart.release .. " failed too") end
      step:fail(string.format("release %s: %s did not become ready within %s (kubectl rollout status exit %s)",
        chart.release, name, timeout, tostring(r.code)))
    end
  end
  if not step.dry_run then
    step.log.info(string.format("release %s: %d workload(s) rolled out", chart.release, #names))
  end
end

function M:upgrade(step, chart)
  base.upgrade(self, step, chart)
  self:rollout(step, chart)
end

return M
