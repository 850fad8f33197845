-- ops.crypto: hashing, MACs, constant-time comparison, random bytes, hex and
-- base64 (all from ops.core.crypto) plus webhook-signature helpers.

local core = require("ops.core.crypto")

local crypto = {}
for name, fn in pairs(core) do crypto[name] = fn end

-- crypto.random_hex(n) -> 2n hex digits from n random bytes (ids, nonces)
function crypto.random_hex(n)
  local bytes, err, code = core.random(n)
  if not bytes then return nil, err, code end
  return core.hex(bytes)
end

-- crypto.verify_hmac_sha256(key, data, signature) -> boolean
-- signature is hex, optionally prefixed "sha256=" (GitHub's X-Hub-Signature-256).
-- Compared in constant time; a malformed signature is simply not valid.
function crypto.verify_hmac_sha256(key, data, signature)
  if type(signature) ~= "string" then return false end
  local hex = signature:match("^sha256=(.*)$") or signature
  return core.equals(core.hmac_sha256(key, data), hex:lower())
end

return crypto
