-- notify-webhook.lua: post a Slack-style message ({"text": ...}) when a step has deployed.
--
-- Install: copy into a tool folder's hook directory, as
--   <env>/<tool>/bitops.after-deploy.d/90-notify.lua   (after a successful deploy)
--   <env>/<tool>/bitops.on-failure.d/90-notify.lua     (after a failed one)
-- and give the run NOTIFY_WEBHOOK_URL (a Slack incoming webhook, a Mattermost or Teams
-- connector URL: anything taking a JSON {"text": ...} POST). Without it the hook does
-- nothing.
--
-- The URL is a credential: it is registered with ops.secret, so it reads as *** in every
-- log line and in the step's recorded log tail. A notification that cannot be delivered
-- is logged as a warning and does not fail the deploy. A POST is not retried (a retry
-- could post twice).
local step = ...

local url = step.vars.NOTIFY_WEBHOOK_URL or os.getenv("NOTIFY_WEBHOOK_URL")
if not url or url == "" then return end
ops.secret(url)

-- this file's folder says whether the deploy worked
local source = debug.getinfo(1, "S").source
local failed = source:find("bitops.on-failure.d", 1, true) ~= nil

local text = string.format("%s %s %s (run %s of %s)",
  failed and ":x:" or ":white_check_mark:",
  step.id,
  failed and "failed" or "deployed",
  step.vars.OPSRUN_RUN_ID or "-",
  step.vars.OPSRUN_REPO or "?")

local res, err = ops.http.request {
  method = "POST",
  url = url,
  headers = {["Content-Type"] = "application/json"},
  body = ops.json.encode({text = text}),
  timeout = 10,
}
if not res then
  step.log.warn("notify: the webhook could not be reached: " .. err)
elseif res.status >= 300 then
  step.log.warn(string.format("notify: the webhook answered %d: %s", res.status, (res.body or ""):sub(1, 200)))
else
  step.log.info("notify: sent")
end
