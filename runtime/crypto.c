/*
 * ops.core.crypto: hashing, MACs, constant-time comparison, random bytes and
 * hex/base64 codecs on OpenSSL libcrypto.
 *
 * libcrypto is not linked but loaded (dlopen) by the first function that needs it, as
 * http_client.c loads libcurl: linking it cost every opsrun start-up about half a
 * millisecond, crypto or not. The OpenSSL headers still give the types and constants; the
 * functions are called through the `ossl` table below. Without libcrypto, a function with
 * an error return gives nil, "libcrypto is not available: ...", "ENOSYS"; one without
 * (equals, base64_encode) raises that message.
 */
#include <dlfcn.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lua.h>
#include <lauxlib.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/params.h>
#include <openssl/rand.h>

#define RANDOM_MAX_BYTES (1024 * 1024)

static const char hex_digits[] = "0123456789abcdef";

/* ---- libcrypto, loaded on first use ---- */

#define CRYPTO_LIBRARY "libcrypto.so.3"
#define CRYPTO_FUNCTIONS(X) \
	X(EVP_Digest) X(EVP_sha256) X(HMAC) X(CRYPTO_memcmp) X(RAND_bytes) X(EVP_EncodeBlock) \
	X(EVP_DecodeBlock) X(EVP_MAC_fetch) X(EVP_MAC_CTX_new) X(EVP_MAC_CTX_dup) X(EVP_MAC_CTX_free) \
	X(EVP_MAC_init) X(EVP_MAC_update) X(EVP_MAC_final) X(OSSL_PARAM_construct_utf8_string) \
	X(OSSL_PARAM_construct_end) X(OPENSSL_cleanse)

/* ossl.HMAC(...) calls HMAC(...): each member has the type of its libcrypto function. */
static struct {
#define CRYPTO_MEMBER(name) __typeof__(name) *name;
	CRYPTO_FUNCTIONS(CRYPTO_MEMBER)
#undef CRYPTO_MEMBER
} ossl;

static int ossl_loaded;            /* 1: the table is filled; -1: loading failed */
static char ossl_load_error[512];  /* why, when it failed (dlerror's text) */

/* Returns 1 once every function is resolved; 0 (ossl_load_error says why) when they cannot
 * be. Tried once: the answer does not change while opsrun runs. */
static int ossl_load(void)
{
	if (ossl_loaded)
		return ossl_loaded > 0;
	ossl_loaded = -1;
	void *lib = dlopen(CRYPTO_LIBRARY, RTLD_NOW | RTLD_LOCAL);
	if (lib == NULL) {
		snprintf(ossl_load_error, sizeof ossl_load_error, "%s", dlerror());
		return 0;
	}
#define CRYPTO_RESOLVE(name) \
	if ((*(void **)&ossl.name = dlsym(lib, #name)) == NULL) { \
		snprintf(ossl_load_error, sizeof ossl_load_error, "%s", dlerror()); \
		dlclose(lib); \
		return 0; \
	}
	CRYPTO_FUNCTIONS(CRYPTO_RESOLVE)
#undef CRYPTO_RESOLVE
	ossl_loaded = 1;
	return 1;
}

/* nil, "libcrypto is not available: ...", "ENOSYS" */
static int push_unavailable(lua_State *L)
{
	lua_pushnil(L);
	lua_pushfstring(L, "libcrypto is not available: %s", ossl_load_error);
	lua_pushliteral(L, "ENOSYS");
	return 3;
}

/* For the functions without an error return: raises the same message. */
static void require_ossl(lua_State *L)
{
	if (!ossl_load())
		luaL_error(L, "libcrypto is not available: %s", ossl_load_error);
}

static void push_hex(lua_State *L, const unsigned char *p, size_t n)
{
	luaL_Buffer b;
	char *out = luaL_buffinitsize(L, &b, n * 2);
	for (size_t i = 0; i < n; i++) {
		out[2 * i] = hex_digits[p[i] >> 4];
		out[2 * i + 1] = hex_digits[p[i] & 0x0f];
	}
	luaL_pushresultsize(&b, n * 2);
}

static void push_digest(lua_State *L, const unsigned char *md, size_t n, int raw)
{
	if (raw)
		lua_pushlstring(L, (const char *)md, n);
	else
		push_hex(L, md, n);
}

static int push_crypto_error(lua_State *L, const char *what)
{
	lua_pushnil(L);
	lua_pushfstring(L, "ECRYPTO: %s failed in OpenSSL", what);
	lua_pushliteral(L, "ECRYPTO");
	return 3;
}

static int push_einval(lua_State *L, const char *msg)
{
	lua_pushnil(L);
	lua_pushfstring(L, "EINVAL: %s", msg);
	lua_pushliteral(L, "EINVAL");
	return 3;
}

/* crypto.sha256(data [, raw]) -> hex | raw bytes */
static int crypto_sha256(lua_State *L)
{
	size_t n;
	const char *data = luaL_checklstring(L, 1, &n);
	int raw = lua_toboolean(L, 2);
	unsigned char md[EVP_MAX_MD_SIZE];
	unsigned int mdlen = 0;

	if (!ossl_load())
		return push_unavailable(L);
	if (!ossl.EVP_Digest(data, n, md, &mdlen, ossl.EVP_sha256(), NULL))
		return push_crypto_error(L, "sha256");
	push_digest(L, md, mdlen, raw);
	return 1;
}

/*
 * HMAC-SHA256 contexts already keyed, for the last few keys used. HMAC() looks the MAC and
 * the digest up again (EVP_Q_mac) and hashes the key on every call: for a webhook
 * receiver, which checks every delivery against one of a few secrets, that was most of
 * the work. A call duplicates the keyed context and feeds its data to the copy.
 * The keys are kept (to know them again) and wiped when their slot is taken.
 */
#define HMAC_KEYS 8

static struct hmac_key {
	unsigned char *key;
	size_t len;
	EVP_MAC_CTX *ctx; /* keyed; never fed data */
} hmac_keys[HMAC_KEYS];
static unsigned hmac_next;  /* the slot the next new key takes */
static EVP_MAC *hmac_mac;

static void hmac_key_clear(struct hmac_key *k)
{
	if (k->key != NULL) {
		ossl.OPENSSL_cleanse(k->key, k->len);
		free(k->key);
	}
	if (k->ctx != NULL)
		ossl.EVP_MAC_CTX_free(k->ctx);
	k->key = NULL;
	k->len = 0;
	k->ctx = NULL;
}

/* The keyed context for key, made on first use; NULL when OpenSSL cannot make one. */
static EVP_MAC_CTX *hmac_keyed(const char *key, size_t klen)
{
	for (unsigned i = 0; i < HMAC_KEYS; i++) {
		struct hmac_key *k = &hmac_keys[i];
		/* in constant time: a caller may pass a key someone else chose, and the kept
		 * keys are secrets */
		if (k->ctx != NULL && k->len == klen && ossl.CRYPTO_memcmp(k->key, key, klen) == 0)
			return k->ctx;
	}
	if (hmac_mac == NULL && (hmac_mac = ossl.EVP_MAC_fetch(NULL, "HMAC", NULL)) == NULL)
		return NULL;
	EVP_MAC_CTX *ctx = ossl.EVP_MAC_CTX_new(hmac_mac);
	unsigned char *copy = malloc(klen > 0 ? klen : 1);
	OSSL_PARAM params[2];
	params[0] = ossl.OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA256", 0);
	params[1] = ossl.OSSL_PARAM_construct_end();
	if (ctx == NULL || copy == NULL ||
	    !ossl.EVP_MAC_init(ctx, (const unsigned char *)key, klen, params)) {
		if (ctx != NULL)
			ossl.EVP_MAC_CTX_free(ctx);
		free(copy);
		return NULL;
	}
	memcpy(copy, key, klen);
	struct hmac_key *k = &hmac_keys[hmac_next];
	hmac_next = (hmac_next + 1) % HMAC_KEYS;
	hmac_key_clear(k);
	k->key = copy;
	k->len = klen;
	k->ctx = ctx;
	return ctx;
}

/* HMAC-SHA256 of data into md (32 bytes) with a copy of key's keyed context; 0 on failure. */
static int hmac_sha256_keyed(const char *key, size_t klen, const char *data, size_t n,
			     unsigned char *md, unsigned int *mdlen)
{
	EVP_MAC_CTX *keyed = hmac_keyed(key, klen);
	EVP_MAC_CTX *ctx = keyed ? ossl.EVP_MAC_CTX_dup(keyed) : NULL;
	size_t len = 0;
	int ok;

	if (ctx == NULL)
		return 0;
	ok = ossl.EVP_MAC_update(ctx, (const unsigned char *)data, n) &&
	     ossl.EVP_MAC_final(ctx, md, &len, EVP_MAX_MD_SIZE);
	ossl.EVP_MAC_CTX_free(ctx);
	*mdlen = (unsigned int)len;
	return ok;
}

/* crypto.hmac_sha256(key, data [, raw]) -> hex | raw bytes */
static int crypto_hmac_sha256(lua_State *L)
{
	size_t klen, n;
	const char *key = luaL_checklstring(L, 1, &klen);
	const char *data = luaL_checklstring(L, 2, &n);
	int raw = lua_toboolean(L, 3);
	unsigned char md[EVP_MAX_MD_SIZE];
	unsigned int mdlen = 0;

	luaL_argcheck(L, klen <= INT_MAX, 1, "key too long");
	if (!ossl_load())
		return push_unavailable(L);
	/* without a keyed context (OpenSSL refused one), the one-shot HMAC() */
	if (!hmac_sha256_keyed(key, klen, data, n, md, &mdlen) &&
	    !ossl.HMAC(ossl.EVP_sha256(), key, (int)klen, (const unsigned char *)data, n, md, &mdlen))
		return push_crypto_error(L, "hmac_sha256");
	push_digest(L, md, mdlen, raw);
	return 1;
}

/* crypto.equals(a, b) -> boolean (constant time for equal lengths) */
static int crypto_equals(lua_State *L)
{
	size_t alen, blen;
	const char *a = luaL_checklstring(L, 1, &alen);
	const char *b = luaL_checklstring(L, 2, &blen);

	require_ossl(L);
	/* Lengths are not secret (a MAC's length is public); contents are. */
	lua_pushboolean(L, alen == blen && ossl.CRYPTO_memcmp(a, b, alen) == 0);
	return 1;
}

/* crypto.random(n) -> n random bytes | nil, err, code */
static int crypto_random(lua_State *L)
{
	lua_Integer n = luaL_checkinteger(L, 1);
	luaL_Buffer b;
	unsigned char *out;

	luaL_argcheck(L, n >= 0 && n <= RANDOM_MAX_BYTES, 1, "must be between 0 and 1048576");
	if (!ossl_load())
		return push_unavailable(L);
	out = (unsigned char *)luaL_buffinitsize(L, &b, (size_t)n);
	if (n > 0 && ossl.RAND_bytes(out, (int)n) != 1)
		return push_crypto_error(L, "RAND_bytes");
	luaL_pushresultsize(&b, (size_t)n);
	return 1;
}

/* crypto.hex(s) -> lowercase hex string */
static int crypto_hex(lua_State *L)
{
	size_t n;
	const char *s = luaL_checklstring(L, 1, &n);
	push_hex(L, (const unsigned char *)s, n);
	return 1;
}

static int hex_value(unsigned char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* crypto.unhex(s) -> bytes | nil, err, "EINVAL" */
static int crypto_unhex(lua_State *L)
{
	size_t n;
	const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &n);
	luaL_Buffer b;
	char *out;

	if (n % 2 != 0)
		return push_einval(L, "hex string has an odd number of digits");
	out = luaL_buffinitsize(L, &b, n / 2);
	for (size_t i = 0; i < n; i += 2) {
		int hi = hex_value(s[i]), lo = hex_value(s[i + 1]);
		if (hi < 0 || lo < 0)
			return push_einval(L, "hex string contains a non-hex character");
		out[i / 2] = (char)((hi << 4) | lo);
	}
	luaL_pushresultsize(&b, n / 2);
	return 1;
}

/* crypto.base64_encode(s) -> standard base64 with padding, no line breaks */
static int crypto_base64_encode(lua_State *L)
{
	size_t n;
	const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &n);
	size_t outlen = 4 * ((n + 2) / 3);
	luaL_Buffer b;
	unsigned char *out;
	size_t done = 0;

	require_ossl(L);
	out = (unsigned char *)luaL_buffinitsize(L, &b, outlen + 1);
	/* EVP_EncodeBlock takes an int length: feed it in chunks that are multiples of 3. */
	while (n > 0) {
		size_t chunk = n > 3 * (1u << 28) ? 3 * (1u << 28) : n;
		done += (size_t)ossl.EVP_EncodeBlock(out + done, s, (int)chunk);
		s += chunk;
		n -= chunk;
	}
	luaL_pushresultsize(&b, done);
	return 1;
}

static int is_b64_space(unsigned char c)
{
	return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\f' || c == '\v';
}

static int is_b64_char(unsigned char c)
{
	return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
	       c == '+' || c == '/';
}

/*
 * crypto.base64_decode(s) -> bytes | nil, err, "EINVAL"
 * Standard alphabet. Whitespace anywhere is ignored (wrapped PEM-style input);
 * padding may be omitted, but if present it must be correct and only at the end.
 */
static int crypto_base64_decode(lua_State *L)
{
	size_t n;
	const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &n);
	luaL_Buffer clean, out;
	unsigned char *c, *o;
	size_t len = 0, pad = 0, outlen;
	int got;

	if (n > (size_t)INT_MAX - 4)
		return push_einval(L, "base64 input too large");
	c = (unsigned char *)luaL_buffinitsize(L, &clean, n + 4);
	for (size_t i = 0; i < n; i++) {
		unsigned char ch = s[i];
		if (is_b64_space(ch))
			continue;
		if (ch == '=') {
			pad++;
			if (pad > 2)
				return push_einval(L, "base64 has too much padding");
		} else if (!is_b64_char(ch)) {
			return push_einval(L, "base64 contains an invalid character");
		} else if (pad > 0) {
			return push_einval(L, "base64 has data after padding");
		}
		c[len++] = ch;
	}
	if (pad == 0) {
		if (len % 4 == 1)
			return push_einval(L, "base64 length is not valid");
		while (len % 4 != 0) {
			c[len++] = '=';
			pad++;
		}
	} else if (len % 4 != 0) {
		return push_einval(L, "base64 padding does not match length");
	}
	if (len == 0) {
		lua_pushliteral(L, "");
		return 1;
	}
	if (!ossl_load())
		return push_unavailable(L);
	outlen = len / 4 * 3;
	o = (unsigned char *)luaL_buffinitsize(L, &out, outlen);
	got = ossl.EVP_DecodeBlock(o, c, (int)len);
	if (got < 0 || (size_t)got != outlen)
		return push_einval(L, "base64 could not be decoded");
	/* EVP_DecodeBlock counts the padding as zero bytes; drop them. */
	luaL_pushresultsize(&out, outlen - pad);
	return 1;
}

static const luaL_Reg crypto_funcs[] = {
	{"sha256", crypto_sha256},
	{"hmac_sha256", crypto_hmac_sha256},
	{"equals", crypto_equals},
	{"random", crypto_random},
	{"hex", crypto_hex},
	{"unhex", crypto_unhex},
	{"base64_encode", crypto_base64_encode},
	{"base64_decode", crypto_base64_decode},
	{NULL, NULL},
};

int luaopen_ops_core_crypto(lua_State *L)
{
	luaL_newlib(L, crypto_funcs);
	return 1;
}
