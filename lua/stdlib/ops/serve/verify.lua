-- ops.serve.verify: is a delivery really from the forge, and what does it say?
-- One function per provider: verify(hook, req) -> push | nil, status, reason
--   push = {delivery, event, ref, branch, before, after, deleted, created, forced,
--           commits (the payload's list: a hint only), repository}
-- status is the HTTP answer for a delivery that stops here (401 unsigned, 400 malformed,
-- 200 ping, 202 ignored). The signature is checked before anything else is read.
local crypto = require "ops.crypto"
local json = require "ops.json"

-- lua-cjson's decoder with ops.json's settings, without its pass that turns whole floats
-- into integers (a push's fields are strings and booleans): every delivery is decoded, and
-- that pass cost a third of it. A body it refuses is decoded again by ops.json.decode for
-- the message (with its line and column).
local raw = require("cjson").new()
raw.decode_max_depth(512)
raw.decode_invalid_numbers(false)
local raw_decode = raw.decode

local verify = {}

local ZERO = string.rep("0", 40)

local function header(req, name) return req.headers[name] end

local function check_hmac(secret, body, given)
  if type(given) ~= "string" or given == "" then return false end
  local want = crypto.hmac_sha256(secret, body)
  return crypto.equals(want, given:lower())
end

local find, byte = string.find, string.byte

-- The checks below run on every delivery: each is one anchored find over a class of
-- ranges where it can be (a negated class searched for at every position costs two to
-- three times as much). tests/lua/serve_verify_spec.lua holds them to the rules as first
-- written, byte by byte.
local function is_sha(s)
  return type(s) == "string" and (#s == 40 or #s == 64) and find(s, "^[0-9a-f]*$") ~= nil
end

local function url_decode(s)
  s = s:gsub("+", " ")
  return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

-- GitHub sends application/x-www-form-urlencoded when the hook's content type is
-- "form": the JSON is the `payload` field (the signature still covers the raw body).
-- A JSON body under that content type (curl -d) is read as JSON.
local function json_text(req)
  local ctype = (header(req, "content-type") or ""):lower()
  if ctype:find("application/x-www-form-urlencoded", 1, true) and not req.body:match("^%s*[%[{]") then
    for field in req.body:gmatch("[^&]+") do
      local k, v = field:match("^([^=]*)=(.*)$")
      if k == "payload" then return url_decode(v) end
    end
    return nil, "a form-encoded body without a payload field"
  end
  return req.body
end

-- A path a forge would send: relative, no empty, `.` or `..` part, no control bytes.
local function sane_path(p)
  if type(p) ~= "string" or p == "" or #p > 4096 or p:sub(1, 1) == "/" or p:find("[%z\1-\31\127]") then
    return false
  end
  for part in (p .. "/"):gmatch("([^/]*)/") do
    if part == "" or part == "." or part == ".." then return false end
  end
  return true
end

-- A ref git would accept as a name (git check-ref-format's rules that matter here). Most
-- refs are letters, digits, "-", "_" and "/": with no dot, "@" or other byte, only the
-- rules on slashes can refuse one.
local function valid_ref(ref)
  if #ref > 255 then return false end
  if find(ref, "^[%-/-9A-Z_a-z]*$") then return not (find(ref, "//", 1, true) or byte(ref, -1) == 47) end
  return not (ref:find("%.%.") or ref:find("//", 1, true) or ref:find("/$") or ref:find("/%.")
    or ref:find("%.lock$") or ref:find("@{", 1, true) or ref:find("[%z\1-\32\127~^:?*%[\\]"))
end

local PATH_LISTS = {"added", "modified", "removed"}

-- What parse_push reads of a payload. The body is parsed whole by simdjson
-- (ops.core.json_select, in the server's module: ≈ 4 µs for a 7 KB GitHub push, where
-- lua-cjson takes ≈ 30), and Lua values are made only of these; a body it refuses (not
-- JSON, not UTF-8, a number out of range, deeper than 500) is decoded by lua-cjson as
-- before, whose verdict and message count. Both keep a repeated key's last value.
local PUSH_FIELDS = {
  ref = true, before = true, after = true, forced = true,
  repository = {full_name = true, path_with_namespace = true, name = true},
  commits = {["[]"] = {id = true, added = true, modified = true, removed = true}},
}
local select_json -- json_select's select once loaded, false when it cannot be
local function decode_push(text)
  if select_json == nil then
    local ok, m = pcall(require, "ops.core.json_select")
    select_json = ok and m.select or false
  end
  if select_json then
    local p = select_json(text, PUSH_FIELDS)
    if p ~= nil then return true, p end
  end
  return pcall(raw_decode, text)
end

--- Reads a push payload into the common shape; nil, 400, reason when it is not one.
local function parse_push(req, delivery, event)
  local text, terr = json_text(req)
  if not text then return nil, 400, terr end
  local ok, p = decode_push(text)
  if not ok then
    local err
    p, err = json.decode(text)
    if p == nil then return nil, 400, "the body is not a JSON object: " .. tostring(err) end
  end
  if type(p) ~= "table" then return nil, 400, "the body is not a JSON object: " .. type(p) end
  local ref, before, after = p.ref, p.before, p.after
  if type(ref) ~= "string" or not ref:match("^refs/") then return nil, 400, "the payload has no ref" end
  if not valid_ref(ref) then return nil, 400, "the ref is not a valid git ref name" end
  if not is_sha(before) or not is_sha(after) then
    return nil, 400, "before and after must be commit ids (40 or 64 hex digits)"
  end
  local branch = ref:match("^refs/heads/(.+)$")
  local commits = {}
  if p.commits ~= nil and p.commits ~= json.null then
    if type(p.commits) ~= "table" then return nil, 400, "commits must be a list" end
    for _, c in ipairs(p.commits) do
      if type(c) == "table" then
        for _, list in ipairs(PATH_LISTS) do
          local paths = c[list]
          if paths ~= nil and paths ~= json.null then
            if type(paths) ~= "table" then return nil, 400, "commits[]." .. list .. " must be a list of paths" end
            for _, path in ipairs(paths) do
              if not sane_path(path) then
                return nil, 400, "commits[]." .. list .. " holds a path that is not a relative path inside the repo"
              end
            end
          end
        end
        commits[#commits + 1] = {id = c.id, added = c.added, modified = c.modified, removed = c.removed}
      end
    end
  end
  local repo = type(p.repository) == "table" and (p.repository.full_name or p.repository.path_with_namespace
    or p.repository.name) or nil
  return {
    delivery = delivery, event = event, ref = ref, branch = branch, before = before, after = after,
    created = before:match("^0+$") ~= nil, deleted = after:match("^0+$") ~= nil,
    forced = p.forced == true, commits = commits, repository = type(repo) == "string" and repo or nil,
  }
end

-- (%c and these ranges are the same bytes: opsrun runs in the C locale)
local function valid_id(s) return type(s) == "string" and s ~= "" and #s <= 128 and find(s, "^[^\0-\31\127]*$") ~= nil end

verify.providers = {}

--- GitHub: X-Hub-Signature-256 (HMAC-SHA256 of the raw body), X-GitHub-Event, X-GitHub-Delivery
function verify.providers.github(hook, req)
  -- "sha256=" and the hex digest: a value that is not hex never equals the MAC's hex
  -- (check_hmac), so ^sha256=(%x+)$ need not be matched first
  local sig = header(req, "x-hub-signature-256")
  if not check_hmac(hook.secret, req.body, sig and sig:sub(1, 7) == "sha256=" and sig:sub(8) or nil) then
    return nil, 401, "missing or wrong X-Hub-Signature-256"
  end
  local event = header(req, "x-github-event")
  local delivery = header(req, "x-github-delivery")
  if event == "ping" then return nil, 200, "pong" end
  if event ~= "push" then return nil, 202, "event '" .. tostring(event) .. "' is not handled (only push)" end
  if not valid_id(delivery) then
    return nil, 400, "missing or invalid X-GitHub-Delivery (at most 128 printable characters)"
  end
  return parse_push(req, delivery, event)
end

--- GitLab: X-Gitlab-Token (the secret itself), X-Gitlab-Event: Push Hook, X-Gitlab-Event-UUID
function verify.providers.gitlab(hook, req)
  local token = header(req, "x-gitlab-token")
  -- compare digests: equal lengths, so not even the token's length leaks
  if type(token) ~= "string" or not crypto.equals(crypto.sha256(token), crypto.sha256(hook.secret)) then
    return nil, 401, "missing or wrong X-Gitlab-Token"
  end
  local event = header(req, "x-gitlab-event")
  if event ~= "Push Hook" then return nil, 202, "event '" .. tostring(event) .. "' is not handled (only Push Hook)" end
  local delivery = header(req, "x-gitlab-event-uuid") or header(req, "x-gitlab-webhook-uuid")
  if not valid_id(delivery) then
    -- older GitLab sends no id: the body itself identifies a redelivery
    delivery = "sha256:" .. crypto.sha256(req.body)
  end
  return parse_push(req, delivery, "push")
end

--- Gitea and Forgejo: X-Gitea-Signature / X-Forgejo-Signature (bare hex HMAC-SHA256)
function verify.providers.gitea(hook, req)
  local sig = header(req, "x-forgejo-signature") or header(req, "x-gitea-signature")
  if not check_hmac(hook.secret, req.body, sig) then
    return nil, 401, "missing or wrong X-Gitea-Signature / X-Forgejo-Signature"
  end
  local event = header(req, "x-forgejo-event") or header(req, "x-gitea-event")
  local delivery = header(req, "x-forgejo-delivery") or header(req, "x-gitea-delivery")
  if event ~= "push" then return nil, 202, "event '" .. tostring(event) .. "' is not handled (only push)" end
  if not valid_id(delivery) then
    delivery = "sha256:" .. crypto.sha256(req.body)
  end
  return parse_push(req, delivery, "push")
end
verify.providers.forgejo = verify.providers.gitea

verify.ZERO = ZERO
verify.decode_json = raw_decode -- raises on a text that is not JSON
verify.PUSH_FIELDS = PUSH_FIELDS
verify.is_sha = is_sha
verify.valid_ref = valid_ref
verify.valid_id = valid_id
verify.sane_path = sane_path

return verify
