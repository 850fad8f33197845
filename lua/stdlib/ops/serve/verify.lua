-- ops.serve.verify: is a delivery really from the forge, and what does it say?
-- One function per provider: verify(hook, req) -> push | nil, status, reason
--   push = {delivery, event, ref, branch, before, after, deleted, created, forced,
--           commits (the payload's list: a hint only), repository}
-- status is the HTTP answer for a delivery that stops here (401 unsigned, 400 malformed,
-- 200 ping, 202 ignored).
local crypto = require "ops.crypto"
local json = require "ops.json"

local verify = {}

local ZERO = string.rep("0", 40)

local function header(req, name) return req.headers[name] end

local function check_hmac(secret, body, given)
  if type(given) ~= "string" or given == "" then return false end
  local want = crypto.hmac_sha256(secret, body)
  return crypto.equals(want, given:lower())
end

local function is_sha(s)
  return type(s) == "string" and (#s == 40 or #s == 64) and not s:find("[^0-9a-f]")
end

--- Reads a push payload into the common shape; nil, 400, reason when it is not one.
local function parse_push(body, delivery, event)
  local p, err = json.decode(body)
  if type(p) ~= "table" then return nil, 400, "the body is not JSON: " .. tostring(err) end
  local ref, before, after = p.ref, p.before, p.after
  if type(ref) ~= "string" or not ref:match("^refs/") then return nil, 400, "the payload has no ref" end
  if #ref > 255 or ref:find("%.%.") or ref:find("[%z\1-\31\127 ~^:?*%[\\]") then
    return nil, 400, "the ref is not a valid git ref name"
  end
  if not is_sha(before) or not is_sha(after) then
    return nil, 400, "before and after must be commit ids (40 or 64 hex digits)"
  end
  local branch = ref:match("^refs/heads/(.+)$")
  local commits = {}
  if type(p.commits) == "table" then
    for _, c in ipairs(p.commits) do
      if type(c) == "table" then
        commits[#commits + 1] = {id = c.id, added = c.added, modified = c.modified, removed = c.removed}
      end
    end
  end
  local repo = type(p.repository) == "table" and (p.repository.full_name or p.repository.path_with_namespace
    or p.repository.name) or nil
  return {
    delivery = delivery, event = event, ref = ref, branch = branch, before = before, after = after,
    created = before:match("^0+$") ~= nil, deleted = after:match("^0+$") ~= nil,
    forced = p.forced == true, commits = commits, repository = repo,
  }
end

verify.providers = {}

--- GitHub: X-Hub-Signature-256 (HMAC-SHA256 of the raw body), X-GitHub-Event, X-GitHub-Delivery
function verify.providers.github(hook, req)
  if not check_hmac(hook.secret, req.body, (header(req, "x-hub-signature-256") or ""):match("^sha256=(%x+)$")) then
    return nil, 401, "missing or wrong X-Hub-Signature-256"
  end
  local event = header(req, "x-github-event")
  local delivery = header(req, "x-github-delivery")
  if event == "ping" then return nil, 200, "pong" end
  if event ~= "push" then return nil, 202, "event '" .. tostring(event) .. "' is not handled" end
  if type(delivery) ~= "string" or delivery == "" or #delivery > 128 then
    return nil, 400, "missing X-GitHub-Delivery"
  end
  return parse_push(req.body, delivery, event)
end

--- GitLab: X-Gitlab-Token (the secret itself), X-Gitlab-Event: Push Hook, X-Gitlab-Event-UUID
function verify.providers.gitlab(hook, req)
  local token = header(req, "x-gitlab-token")
  if type(token) ~= "string" or not crypto.equals(token, hook.secret) then
    return nil, 401, "missing or wrong X-Gitlab-Token"
  end
  local event = header(req, "x-gitlab-event")
  if event ~= "Push Hook" then return nil, 202, "event '" .. tostring(event) .. "' is not handled" end
  local delivery = header(req, "x-gitlab-event-uuid") or header(req, "x-gitlab-webhook-uuid")
  if type(delivery) ~= "string" or delivery == "" or #delivery > 128 then
    -- older GitLab sends no id: the body itself identifies a redelivery
    delivery = "sha256:" .. crypto.sha256(req.body)
  end
  return parse_push(req.body, delivery, "push")
end

--- Gitea and Forgejo: X-Gitea-Signature / X-Forgejo-Signature (bare hex HMAC-SHA256)
function verify.providers.gitea(hook, req)
  local sig = header(req, "x-gitea-signature") or header(req, "x-forgejo-signature")
  if not check_hmac(hook.secret, req.body, sig) then
    return nil, 401, "missing or wrong X-Gitea-Signature"
  end
  local event = header(req, "x-gitea-event") or header(req, "x-forgejo-event")
  local delivery = header(req, "x-gitea-delivery") or header(req, "x-forgejo-delivery")
  if event ~= "push" then return nil, 202, "event '" .. tostring(event) .. "' is not handled" end
  if type(delivery) ~= "string" or delivery == "" or #delivery > 128 then
    delivery = "sha256:" .. crypto.sha256(req.body)
  end
  return parse_push(req.body, delivery, "push")
end
verify.providers.forgejo = verify.providers.gitea

verify.ZERO = ZERO
verify.is_sha = is_sha

return verify
