/*
 * ops.core.yaml: YAML 1.1 <-> Lua values, on libyaml's event parser and emitter.
 *
 * Plain scalars are typed the way PyYAML's safe_load types them (BitOps reads its
 * config with PyYAML, and a config file must mean the same thing under both).
 *
 * The loader builds values iteratively from the event stream: no C recursion, so
 * nesting depth is bounded by MAX_DEPTH only.  libyaml objects live in a userdata
 * whose __gc releases them, so a Lua error (out of memory) cannot leak them.
 */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <yaml.h>

#include "opsrun.h"

#define MAX_DEPTH 512
/* Nodes that aliases may add to a stream; the billion-laughs document needs 10^9. */
#define MAX_ALIAS_NODES 1000000ULL

#define LOADER_MT "ops.core.yaml.loader"
#define DUMPER_MT "ops.core.yaml.dumper"
#define ARRAY_MT "ops.array"
#define OBJECT_MT "ops.object"
#define KEY_ORDER "ops.core.yaml.key_order" /* weak-keyed: mapping -> its keys in order */

#define YAML_TAG_PREFIX "tag:yaml.org,2002:"

/* ---------------------------------------------------------------- scalars */

enum { SV_STR, SV_NULL, SV_BOOL, SV_INT, SV_FLOAT, SV_MERGE };

typedef struct {
  int type;
  int b;
  lua_Integer i;
  lua_Number d;
} scalar_value;

static int is_digit(char c) { return c >= '0' && c <= '9'; }

static int digit_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return 99;
}

static int equals(const char *s, size_t n, const char *lit) {
  return strlen(lit) == n && memcmp(s, lit, n) == 0;
}

static int equals_any(const char *s, size_t n, const char *const *lits) {
  for (; *lits; lits++)
    if (equals(s, n, *lits)) return 1;
  return 0;
}

static const char *const null_words[] = {"~", "null", "Null", "NULL", NULL};
static const char *const true_words[] = {"yes", "Yes", "YES", "true", "True",
                                         "TRUE", "on", "On", "ON", NULL};
static const char *const false_words[] = {"no", "No", "NO", "false", "False",
                                          "FALSE", "off", "Off", "OFF", NULL};

/* Accumulates digits of `base` from s[0..n), skipping '_'; -1 if a character is not a digit. */
typedef struct {
  unsigned long long u;
  double d;
  int overflow;
  int digits;
} accum;

static int accumulate(accum *a, const char *s, size_t n, int base) {
  for (size_t k = 0; k < n; k++) {
    if (s[k] == '_') continue;
    int v = digit_value(s[k]);
    if (v >= base) return -1;
    a->d = a->d * base + v;
    if (a->u > (~0ULL - (unsigned)v) / (unsigned)base) a->overflow = 1;
    a->u = a->u * (unsigned)base + (unsigned)v;
    a->digits++;
  }
  return 0;
}

static void set_int(scalar_value *out, const accum *a, int neg) {
  const unsigned long long limit = (unsigned long long)LUA_MAXINTEGER + (neg ? 1u : 0u);
  if (a->overflow || a->u > limit) {
    out->type = SV_FLOAT; /* past 64 bits, like tonumber("99999999999999999999") */
    out->d = neg ? -a->d : a->d;
  } else {
    out->type = SV_INT;
    out->i = neg ? (lua_Integer)(0ULL - a->u) : (lua_Integer)a->u;
  }
}

/* strtod over s[0..n) with '_' removed; 1 if the whole text is a number. */
static int parse_double(const char *s, size_t n, double *out) {
  char small[64];
  char *buf = n < sizeof small ? small : malloc(n + 1);
  size_t k = 0;
  char *end;
  if (!buf) return 0;
  for (size_t j = 0; j < n; j++)
    if (s[j] != '_') buf[k++] = s[j];
  buf[k] = '\0';
  *out = strtod(buf, &end);
  int ok = k > 0 && end == buf + k;
  if (buf != small) free(buf);
  return ok;
}

/* One sexagesimal group ":[0-5]?[0-9]"; returns its length or 0. */
static size_t sexagesimal_group(const char *s, size_t n) {
  if (n >= 3 && s[0] == ':' && s[1] >= '0' && s[1] <= '5' && is_digit(s[2])) return 3;
  if (n >= 2 && s[0] == ':' && is_digit(s[1])) return 2;
  return 0;
}

/* PyYAML int: [-+]?(0b[01_]+ | 0[0-7_]+ | 0 | [1-9][0-9_]* | 0x[0-9a-fA-F_]+ | [1-9][0-9_]*(:[0-5]?[0-9])+) */
static int match_int(const char *s, size_t n, scalar_value *out) {
  size_t i = 0;
  int neg = 0;
  accum a = {0, 0, 0, 0};
  if (i < n && (s[i] == '-' || s[i] == '+')) neg = s[i++] == '-';
  if (i >= n) return 0;
  const char *p = s + i;
  size_t m = n - i;
  if (m >= 2 && p[0] == '0' && (p[1] == 'b' || p[1] == 'x')) {
    int base = p[1] == 'b' ? 2 : 16;
    if (m == 2 || accumulate(&a, p + 2, m - 2, base) < 0 || a.digits == 0) return 0;
  } else if (p[0] == '0') {
    if (accumulate(&a, p, m, 8) < 0) return 0;
  } else if (p[0] >= '1' && p[0] <= '9') {
    size_t k = 1;
    while (k < m && (is_digit(p[k]) || p[k] == '_')) k++;
    if (accumulate(&a, p, k, 10) < 0) return 0;
    if (k < m) {
      accum total = a;
      if (sexagesimal_group(p + k, m - k) == 0) return 0;
      while (k < m) {
        size_t g = sexagesimal_group(p + k, m - k);
        accum part = {0, 0, 0, 0};
        if (g == 0) return 0;
        accumulate(&part, p + k + 1, g - 1, 10);
        total.d = total.d * 60 + part.d;
        if (total.u > (~0ULL - part.u) / 60) total.overflow = 1;
        total.u = total.u * 60 + part.u;
        k += g;
      }
      a = total;
    }
  } else {
    return 0;
  }
  set_int(out, &a, neg);
  if (out->type == SV_FLOAT && p[0] != '0' && !memchr(p, ':', m)) parse_double(s, n, &out->d);
  return 1;
}

static int match_exponent(const char *s, size_t n) { /* ([eE][-+][0-9]+)? up to the end */
  if (n == 0) return 1;
  if (n < 3 || (s[0] != 'e' && s[0] != 'E') || (s[1] != '-' && s[1] != '+')) return 0;
  for (size_t k = 2; k < n; k++)
    if (!is_digit(s[k])) return 0;
  return 1;
}

static size_t span_digits(const char *s, size_t n, size_t k) {
  while (k < n && (is_digit(s[k]) || s[k] == '_')) k++;
  return k;
}

/*
 * PyYAML float:
 *   [-+]?[0-9][0-9_]*\.[0-9_]*([eE][-+][0-9]+)?  |  \.[0-9_]+([eE][-+][0-9]+)?
 * | [-+]?[0-9][0-9_]*(:[0-5]?[0-9])+\.[0-9_]*     |  [-+]?\.(inf|Inf|INF)  |  \.(nan|NaN|NAN)
 */
static int match_float(const char *s, size_t n, scalar_value *out) {
  static const char *const inf_words[] = {"inf", "Inf", "INF", NULL};
  static const char *const nan_words[] = {".nan", ".NaN", ".NAN", NULL};
  size_t i = 0;
  int signed_ = 0, neg = 0;
  double d;
  if (i < n && (s[i] == '-' || s[i] == '+')) {
    signed_ = 1;
    neg = s[i++] == '-';
  }
  if (i >= n) return 0;
  if (s[i] == '.') {
    if (equals_any(s + i + 1, n - i - 1, inf_words)) {
      d = HUGE_VAL;
    } else if (!signed_ && equals_any(s, n, nan_words)) {
      d = NAN;
    } else {
      size_t k = span_digits(s, n, i + 1);
      if (signed_ || k == i + 1 || !match_exponent(s + k, n - k) || !parse_double(s, n, &d))
        return 0;
    }
  } else if (is_digit(s[i])) {
    size_t k = span_digits(s, n, i);
    if (k < n && s[k] == ':') {
      double total;
      accum head = {0, 0, 0, 0};
      size_t g;
      accumulate(&head, s + i, k - i, 10);
      total = head.d;
      while ((g = sexagesimal_group(s + k, n - k)) != 0 && k + g < n && s[k + g] != '.') {
        accum part = {0, 0, 0, 0};
        accumulate(&part, s + k + 1, g - 1, 10);
        total = total * 60 + part.d;
        k += g;
      }
      if (g == 0 || k + g >= n || s[k + g] != '.') return 0;
      if (span_digits(s, n, k + g + 1) != n || !parse_double(s + k + 1, n - k - 1, &d)) return 0;
      d = total * 60 + d;
      if (neg) d = -d;
    } else {
      if (k >= n || s[k] != '.') return 0;
      k = span_digits(s, n, k + 1);
      if (!match_exponent(s + k, n - k) || !parse_double(s, n, &d)) return 0;
    }
    out->type = SV_FLOAT;
    out->d = d;
    return 1;
  } else {
    return 0;
  }
  out->type = SV_FLOAT;
  out->d = neg ? -d : d;
  return 1;
}

/* The type PyYAML's implicit resolvers give an untagged plain scalar. */
static void resolve_plain(const char *s, size_t n, scalar_value *out) {
  out->type = SV_STR;
  if (n == 0 || equals_any(s, n, null_words))
    out->type = SV_NULL;
  else if (equals_any(s, n, true_words))
    out->type = SV_BOOL, out->b = 1;
  else if (equals_any(s, n, false_words))
    out->type = SV_BOOL, out->b = 0;
  else if (equals(s, n, "<<"))
    out->type = SV_MERGE;
  else if (!match_int(s, n, out) && !match_float(s, n, out))
    out->type = SV_STR;
}

static int match_bool_ci(const char *s, size_t n, scalar_value *out) {
  char low[8];
  if (n >= sizeof low) return 0;
  for (size_t k = 0; k < n; k++)
    low[k] = (char)((s[k] >= 'A' && s[k] <= 'Z') ? s[k] - 'A' + 'a' : s[k]);
  low[n] = '\0';
  out->type = SV_BOOL;
  if (equals_any(low, n, true_words)) return out->b = 1, 1;
  if (equals_any(low, n, false_words)) return out->b = 0, 1;
  return 0;
}

static void push_scalar_value(lua_State *L, const scalar_value *v, const char *s, size_t n) {
  switch (v->type) {
    case SV_NULL: lua_pushlightuserdata(L, NULL); break;
    case SV_BOOL: lua_pushboolean(L, v->b); break;
    case SV_INT: lua_pushinteger(L, v->i); break;
    case SV_FLOAT: lua_pushnumber(L, v->d); break;
    default: lua_pushlstring(L, s, n); break;
  }
}

/* ---------------------------------------------------------------- loader state */

enum { K_SCALAR, K_MAP, K_SEQ, K_SEQ_OF_MAPS };

typedef struct {
  int is_map;
  int slot; /* container; its anchor name (or nil) at slot-1, merge sources at slot+1 */
  int has_key, merge_pending, all_maps;
  lua_Integer n;
  unsigned long long nodes_at_start;
  yaml_mark_t mark;
} frame;

typedef struct {
  yaml_parser_t parser;
  yaml_event_t event;
  int parser_live, event_live;
  FILE *fp;
  /* malloc'd, grown as the nesting deepens (up to MAX_DEPTH): a few frames are all most
   * documents need, and memory the GC does not count makes no collection debt */
  frame *frames;
  int frames_cap;
} load_state;

typedef struct {
  lua_State *L;
  load_state *st;
  const char *name;
  int all;
  int base; /* anchors at base+1, anchor sizes/kinds at base+2, documents at base+3 */
  int depth;
  lua_Integer ndocs;
  unsigned long long nodes, alias_nodes;
} loader;

static char anchor_in_progress;

static void load_state_close(load_state *st) {
  if (st->event_live) yaml_event_delete(&st->event);
  if (st->parser_live) yaml_parser_delete(&st->parser);
  if (st->fp) fclose(st->fp);
  free(st->frames);
  st->event_live = st->parser_live = 0;
  st->fp = NULL;
  st->frames = NULL;
  st->frames_cap = 0;
}

static int loader_gc(lua_State *L) {
  load_state_close(luaL_checkudata(L, 1, LOADER_MT));
  return 0;
}

static load_state *new_load_state(lua_State *L) {
  load_state *st = lua_newuserdatauv(L, sizeof *st, 0);
  st->parser_live = st->event_live = 0;
  st->fp = NULL;
  st->frames = NULL;
  st->frames_cap = 0;
  luaL_setmetatable(L, LOADER_MT);
  return st;
}

/* A short, printable excerpt of a scalar for error messages. */
static const char *snippet(char *buf, size_t size, const char *s, size_t n) {
  size_t k = n < size - 4 ? n : size - 4;
  while (k > 0 && k < n && ((unsigned char)s[k] & 0xC0) == 0x80) k--;
  memcpy(buf, s, k);
  strcpy(buf + k, k < n ? "..." : "");
  return buf;
}

static int fail(loader *ld, yaml_mark_t mark, const char *fmt, ...) {
  va_list ap;
  lua_pushfstring(ld->L, "%s:%d:%d: ", ld->name, (int)mark.line + 1, (int)mark.column + 1);
  va_start(ap, fmt);
  lua_pushvfstring(ld->L, fmt, ap);
  va_end(ap);
  lua_concat(ld->L, 2);
  return -1;
}

static int parser_fail(loader *ld, const char *buf, size_t len) {
  yaml_parser_t *p = &ld->st->parser;
  lua_State *L = ld->L;
  if (p->error == YAML_MEMORY_ERROR) {
    lua_pushfstring(L, "%s: out of memory while parsing YAML", ld->name);
  } else if (p->error == YAML_READER_ERROR) {
    size_t off = p->problem_offset < len ? p->problem_offset : len;
    int line = 1, col = 1;
    char byte[32] = "";
    for (size_t k = 0; k < off; k++) {
      if (buf[k] == '\n') line++, col = 1;
      else col++;
    }
    if (p->problem_value != -1) snprintf(byte, sizeof byte, " (byte 0x%02X)", p->problem_value & 0xFF);
    lua_pushfstring(L, "%s:%d:%d: %s%s at byte offset %I%s", ld->name, line, col,
                    p->problem ? p->problem : "cannot read input", byte, (lua_Integer)off,
                    p->problem && strstr(p->problem, "UTF-8")
                        ? "; YAML text must be UTF-8 encoded"
                        : "");
  } else {
    yaml_mark_t mark = p->problem_mark;
    lua_pushfstring(L, "%s:%d:%d: %s", ld->name, (int)mark.line + 1, (int)mark.column + 1,
                    p->problem ? p->problem : "invalid YAML");
    if (mark.index < len && buf[mark.index] == '\t') {
      lua_pushliteral(L, ": a tab; indent YAML with spaces");
      lua_concat(L, 2);
    }
    if (p->context) {
      lua_pushfstring(L, " (%s at line %d, column %d)", p->context, (int)p->context_mark.line + 1,
                      (int)p->context_mark.column + 1);
      lua_concat(L, 2);
    }
  }
  return -1;
}

/* ---------------------------------------------------------------- loader */

/* The value on top of the stack is a finished node: attach it to its parent. */
static int complete(loader *ld, int kind, int is_merge_key, yaml_mark_t mark) {
  lua_State *L = ld->L;
  frame *f;
  if (ld->depth == 0) {
    lua_rawseti(L, ld->base + 3, ++ld->ndocs);
    return 0;
  }
  f = &ld->st->frames[ld->depth - 1];
  if (!f->is_map) {
    if (kind != K_MAP) f->all_maps = 0;
    lua_rawseti(L, f->slot, ++f->n);
    return 0;
  }
  if (!f->has_key) {
    f->has_key = 1;
    if (is_merge_key) {
      f->merge_pending = 1;
      return 0;
    }
    if (kind != K_SCALAR)
      return fail(ld, mark, "a mapping key must be a scalar, not a %s",
                  kind == K_MAP ? "mapping" : "sequence");
    if (lua_type(L, -1) == LUA_TNUMBER && !lua_isinteger(L, -1) && isnan(lua_tonumber(L, -1)))
      return fail(ld, mark, ".nan cannot be a mapping key");
    return 0;
  }
  f->has_key = 0;
  if (!f->merge_pending) {
    lua_pushvalue(L, -2); /* the key, in document order */
    lua_rawseti(L, f->slot + 2, (lua_Integer)lua_rawlen(L, f->slot + 2) + 1);
    lua_rawset(L, f->slot);
    return 0;
  }
  f->merge_pending = 0;
  if (kind != K_MAP && kind != K_SEQ_OF_MAPS)
    return fail(ld, mark, "the value of the merge key '<<' must be a mapping or a sequence of mappings");
  if (lua_isnil(L, f->slot + 1)) {
    lua_newtable(L);
    lua_replace(L, f->slot + 1);
  }
  /* Sources are applied last to first, each only filling absent keys: explicit keys win,
     then earlier entries of a '<<' sequence, then later '<<' keys (as PyYAML). */
  if (kind == K_MAP) {
    lua_rawseti(L, f->slot + 1, (lua_Integer)lua_rawlen(L, f->slot + 1) + 1);
  } else {
    for (lua_Integer k = (lua_Integer)lua_rawlen(L, -1); k >= 1; k--) {
      lua_rawgeti(L, -1, k);
      lua_rawseti(L, f->slot + 1, (lua_Integer)lua_rawlen(L, f->slot + 1) + 1);
    }
    lua_pop(L, 1);
  }
  lua_pop(L, 1); /* the '<<' key */
  return 0;
}

static void apply_merges(lua_State *L, int t) {
  for (lua_Integer k = (lua_Integer)lua_rawlen(L, t + 1); k >= 1; k--) {
    lua_rawgeti(L, t + 1, k);
    lua_pushnil(L);
    while (lua_next(L, -2)) {
      lua_pushvalue(L, -2);
      if (lua_rawget(L, t) == LUA_TNIL) {
        lua_pop(L, 1);
        lua_pushvalue(L, -2);
        lua_insert(L, -2);
        lua_rawset(L, t);
      } else {
        lua_pop(L, 2);
      }
    }
    lua_pop(L, 1);
  }
}

static int count_alias_nodes(loader *ld, unsigned long long n, yaml_mark_t mark) {
  if (n > MAX_ALIAS_NODES - ld->alias_nodes)
    return fail(ld, mark,
                "aliases expand to more than %d nodes (an alias bomb?); refusing to load",
                (int)MAX_ALIAS_NODES);
  ld->alias_nodes += n;
  ld->nodes += n;
  return 0;
}

static void register_anchor(loader *ld, const char *anchor, int value_idx, unsigned long long size, int kind) {
  lua_State *L = ld->L;
  lua_pushstring(L, anchor);
  lua_pushvalue(L, value_idx);
  lua_rawset(L, ld->base + 1);
  lua_pushstring(L, anchor);
  lua_pushinteger(L, (lua_Integer)(size * 4 + (unsigned)kind));
  lua_rawset(L, ld->base + 2);
}

static int construct_tagged(loader *ld, const yaml_event_t *ev, const char *tag, scalar_value *v) {
  const char *s = (const char *)ev->data.scalar.value;
  size_t n = ev->data.scalar.length;
  char ex[48];
  v->type = SV_STR;
  if (strcmp(tag, "str") == 0 || strcmp(tag, "timestamp") == 0) return 0;
  if (strcmp(tag, "null") == 0) return v->type = SV_NULL, 0;
  if (strcmp(tag, "bool") == 0 && match_bool_ci(s, n, v)) return 0;
  if (strcmp(tag, "int") == 0 && match_int(s, n, v)) return 0;
  if (strcmp(tag, "float") == 0) {
    if (match_float(s, n, v)) return 0;
    if (match_int(s, n, v)) {
      if (v->type == SV_INT) v->d = (lua_Number)v->i;
      v->type = SV_FLOAT;
      return 0;
    }
    if (parse_double(s, n, &v->d)) return v->type = SV_FLOAT, 0;
  }
  if (strcmp(tag, "bool") == 0 || strcmp(tag, "int") == 0 || strcmp(tag, "float") == 0)
    return fail(ld, ev->start_mark, "cannot read '%s' as !!%s", snippet(ex, sizeof ex, s, n), tag);
  return fail(ld, ev->start_mark,
              "unsupported tag !!%s (supported: !!str !!int !!float !!bool !!null !!seq !!map)", tag);
}

static int on_scalar(loader *ld, const yaml_event_t *ev) {
  const char *tag = (const char *)ev->data.scalar.tag;
  const char *s = (const char *)ev->data.scalar.value;
  size_t n = ev->data.scalar.length;
  frame *top = ld->depth ? &ld->st->frames[ld->depth - 1] : NULL;
  int is_key = top && top->is_map && !top->has_key;
  scalar_value v;
  v.type = SV_STR;
  if (tag == NULL) {
    if (ev->data.scalar.style == YAML_PLAIN_SCALAR_STYLE) resolve_plain(s, n, &v);
  } else if (strncmp(tag, YAML_TAG_PREFIX, sizeof YAML_TAG_PREFIX - 1) == 0) {
    const char *short_tag = tag + sizeof YAML_TAG_PREFIX - 1;
    if (strcmp(short_tag, "merge") == 0)
      v.type = SV_MERGE;
    else if (construct_tagged(ld, ev, short_tag, &v) < 0)
      return -1;
  } else if (strcmp(tag, "!") != 0) {
    return fail(ld, ev->start_mark,
                "unknown tag %s (only the standard !!str !!int !!float !!bool !!null !!seq !!map are supported)",
                tag);
  }
  if (v.type == SV_MERGE && !is_key) v.type = SV_STR;
  ld->nodes++;
  push_scalar_value(ld->L, &v, s, n);
  if (ev->data.scalar.anchor)
    register_anchor(ld, (const char *)ev->data.scalar.anchor, lua_gettop(ld->L), 1, K_SCALAR);
  return complete(ld, K_SCALAR, v.type == SV_MERGE, ev->start_mark);
}

static int on_alias(loader *ld, const yaml_event_t *ev) {
  lua_State *L = ld->L;
  const char *anchor = (const char *)ev->data.alias.anchor;
  lua_Integer info;
  lua_pushstring(L, anchor);
  if (lua_rawget(L, ld->base + 1) == LUA_TNIL) {
    lua_pop(L, 1);
    return fail(ld, ev->start_mark, "undefined alias *%s", anchor);
  }
  if (lua_touserdata(L, -1) == &anchor_in_progress) {
    lua_pop(L, 1);
    return fail(ld, ev->start_mark,
                "alias *%s is used inside the node it names; recursive structures are not supported",
                anchor);
  }
  lua_pushstring(L, anchor);
  lua_rawget(L, ld->base + 2);
  info = lua_tointeger(L, -1);
  lua_pop(L, 1);
  if (count_alias_nodes(ld, (unsigned long long)info >> 2, ev->start_mark) < 0) return -1;
  return complete(ld, (int)(info & 3), 0, ev->start_mark);
}

static int on_collection_start(loader *ld, const yaml_event_t *ev, int is_map) {
  lua_State *L = ld->L;
  const char *tag = (const char *)(is_map ? ev->data.mapping_start.tag : ev->data.sequence_start.tag);
  const char *anchor =
      (const char *)(is_map ? ev->data.mapping_start.anchor : ev->data.sequence_start.anchor);
  frame *f;
  if (ld->depth >= MAX_DEPTH)
    return fail(ld, ev->start_mark, "nesting is deeper than %d levels", MAX_DEPTH);
  if (tag && strcmp(tag, "!") != 0 && strcmp(tag, is_map ? YAML_TAG_PREFIX "map" : YAML_TAG_PREFIX "seq") != 0)
    return fail(ld, ev->start_mark, "unsupported tag %s on a %s", tag, is_map ? "mapping" : "sequence");
  if (ld->depth >= ld->st->frames_cap) {
    int cap = ld->st->frames_cap ? ld->st->frames_cap * 2 : 16;
    frame *grown;
    if (cap > MAX_DEPTH) cap = MAX_DEPTH;
    grown = realloc(ld->st->frames, (size_t)cap * sizeof *grown);
    if (grown == NULL) return fail(ld, ev->start_mark, "out of memory at nesting level %d", ld->depth + 1);
    ld->st->frames = grown;
    ld->st->frames_cap = cap;
  }
  luaL_checkstack(L, 8, "YAML nesting");
  if (anchor) {
    lua_pushstring(L, anchor);
    lua_pushvalue(L, -1);
    lua_pushlightuserdata(L, &anchor_in_progress);
    lua_rawset(L, ld->base + 1);
  } else {
    lua_pushnil(L);
  }
  lua_newtable(L);
  lua_pushnil(L);
  if (is_map)
    lua_newtable(L); /* its keys in document order, for yaml.keys */
  else
    lua_pushnil(L);
  f = &ld->st->frames[ld->depth++];
  f->is_map = is_map;
  f->slot = lua_gettop(L) - 2;
  f->has_key = f->merge_pending = 0;
  f->all_maps = 1;
  f->n = 0;
  f->nodes_at_start = ld->nodes++;
  f->mark = ev->start_mark;
  return 0;
}

static int on_collection_end(loader *ld) {
  lua_State *L = ld->L;
  frame *f = &ld->st->frames[ld->depth - 1];
  int t = f->slot;
  int kind = f->is_map ? K_MAP : f->all_maps ? K_SEQ_OF_MAPS : K_SEQ;
  if (f->is_map && !lua_isnil(L, t + 1)) apply_merges(L, t);
  if (f->is_map) {
    luaL_getsubtable(L, LUA_REGISTRYINDEX, KEY_ORDER);
    lua_pushvalue(L, t);
    lua_pushvalue(L, t + 2);
    lua_rawset(L, -3);
  }
  lua_settop(L, t);
  if (!f->is_map && f->n == 0) luaL_setmetatable(L, ARRAY_MT); /* keeps [] a sequence on dump */
  if (!lua_isnil(L, t - 1))
    register_anchor(ld, lua_tostring(L, t - 1), t, ld->nodes - f->nodes_at_start, kind);
  lua_remove(L, t - 1);
  ld->depth--;
  return complete(ld, kind, 0, f->mark);
}

static int on_event(loader *ld, const yaml_event_t *ev) {
  lua_State *L = ld->L;
  switch (ev->type) {
    case YAML_DOCUMENT_START_EVENT:
      if (!ld->all && ld->ndocs > 0)
        return fail(ld, ev->start_mark,
                    "expected a single document, but found another (use load_all for multi-document YAML)");
      lua_newtable(L); /* anchors do not cross documents */
      lua_replace(L, ld->base + 1);
      lua_newtable(L);
      lua_replace(L, ld->base + 2);
      return 0;
    case YAML_SCALAR_EVENT: return on_scalar(ld, ev);
    case YAML_ALIAS_EVENT: return on_alias(ld, ev);
    case YAML_SEQUENCE_START_EVENT: return on_collection_start(ld, ev, 0);
    case YAML_MAPPING_START_EVENT: return on_collection_start(ld, ev, 1);
    case YAML_SEQUENCE_END_EVENT:
    case YAML_MAPPING_END_EVENT: return on_collection_end(ld);
    default: return 0;
  }
}

/* Parses buf (which a Lua value below the current top keeps alive) and returns load's results. */
static int run_loader(lua_State *L, load_state *st, const char *buf, size_t len, const char *name, int all) {
  loader ld;
  int rc = 0;
  memset(&ld, 0, sizeof ld);
  ld.L = L;
  ld.st = st;
  ld.name = name;
  ld.all = all;
  ld.base = lua_gettop(L);
  luaL_checkstack(L, 16, NULL);
  lua_newtable(L);
  lua_newtable(L);
  lua_newtable(L);
  if (!yaml_parser_initialize(&st->parser)) return luaL_error(L, "out of memory");
  st->parser_live = 1;
  yaml_parser_set_input_string(&st->parser, (const unsigned char *)buf, len);
  for (;;) {
    yaml_event_type_t type;
    if (!yaml_parser_parse(&st->parser, &st->event)) {
      rc = parser_fail(&ld, buf, len);
      break;
    }
    st->event_live = 1;
    type = st->event.type;
    rc = on_event(&ld, &st->event);
    yaml_event_delete(&st->event);
    st->event_live = 0;
    if (rc != 0 || type == YAML_STREAM_END_EVENT) break;
  }
  load_state_close(st);
  if (rc != 0) {
    lua_replace(L, ld.base + 1);
    lua_settop(L, ld.base + 1);
    lua_pushnil(L);
    lua_insert(L, -2);
    lua_pushliteral(L, "EYAML");
    return 3;
  }
  if (all) {
    lua_settop(L, ld.base + 3);
    luaL_setmetatable(L, ARRAY_MT);
  } else if (lua_rawgeti(L, ld.base + 3, 1) == LUA_TNIL) {
    lua_pushlightuserdata(L, NULL); /* an empty stream is one null document */
  }
  return 1;
}

/* yaml.load(text [, name]) -> value | nil, err, "EYAML" */
static int l_load(lua_State *L) {
  size_t len;
  const char *buf = luaL_checklstring(L, 1, &len);
  const char *name = luaL_optstring(L, 2, "<string>");
  lua_settop(L, 2);
  return run_loader(L, new_load_state(L), buf, len, name, 0);
}

/* yaml.load_all(text [, name]) -> {document, ...} | nil, err, "EYAML" */
static int l_load_all(lua_State *L) {
  size_t len;
  const char *buf = luaL_checklstring(L, 1, &len);
  const char *name = luaL_optstring(L, 2, "<string>");
  lua_settop(L, 2);
  return run_loader(L, new_load_state(L), buf, len, name, 1);
}

static int push_errno(lua_State *L, int err, const char *path) {
  static const struct { int err; const char *code, *text; } names[] = {
      {ENOENT, "ENOENT", "no such file"},       {EACCES, "EACCES", "permission denied"},
      {EPERM, "EPERM", "operation not permitted"}, {EISDIR, "EISDIR", "is a directory"},
      {ENOTDIR, "ENOTDIR", "not a directory"},  {ELOOP, "ELOOP", "too many symbolic links"},
      {ENAMETOOLONG, "ENAMETOOLONG", "file name too long"},
      {EMFILE, "EMFILE", "too many open files"}, {ENFILE, "ENFILE", "too many open files"},
      {ENOMEM, "ENOMEM", "out of memory"},      {EFBIG, "EFBIG", "file too large"},
  };
  const char *code = "EIO", *text = strerror(err);
  for (size_t k = 0; k < sizeof names / sizeof names[0]; k++)
    if (names[k].err == err) code = names[k].code, text = names[k].text;
  lua_pushnil(L);
  lua_pushfstring(L, "%s: %s: %s", code, text, path);
  lua_pushstring(L, code);
  return 3;
}

/* yaml.key_order(map) -> {key, ...} in document order | nil for a table not loaded from YAML
 * (keys a merge key brought in are not listed: yaml.keys adds them) */
static int l_key_order(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, KEY_ORDER);
  lua_pushvalue(L, 1);
  lua_rawget(L, -2);
  return 1;
}

/* yaml.load_file(path) -> value | nil, err, code */
static int l_load_file(lua_State *L) {
  const char *path = ops_checkpath(L, 1);
  load_state *st;
  luaL_Buffer b;
  size_t got;
  lua_settop(L, 1);
  st = new_load_state(L);
  st->fp = fopen(path, "rb");
  if (!st->fp) return push_errno(L, errno, path);
  luaL_buffinit(L, &b);
  do {
    char *p = luaL_prepbuffer(&b);
    got = fread(p, 1, LUAL_BUFFERSIZE, st->fp);
    luaL_addsize(&b, got);
  } while (got == LUAL_BUFFERSIZE);
  if (ferror(st->fp)) {
    int err = errno;
    load_state_close(st);
    return push_errno(L, err, path);
  }
  luaL_pushresult(&b);
  fclose(st->fp);
  st->fp = NULL;
  {
    size_t len;
    const char *buf = lua_tolstring(L, -1, &len);
    return run_loader(L, st, buf, len, path, 0);
  }
}

/* ---------------------------------------------------------------- dumper */

typedef struct {
  yaml_emitter_t emitter;
  int emitter_live;
  char *buf;
  size_t len, cap;
} dump_state;

typedef struct {
  int key_idx; /* stack index of the mapping key, or 0 for a sequence index */
  lua_Integer index;
} path_entry;

/* Error paths show this many steps at each end of a deep path. */
#define PATH_SHOWN 8

typedef struct {
  lua_State *L;
  dump_state *ds;
  int visiting;
  int depth;
  path_entry path[MAX_DEPTH + 1];
} dumper;

static void dump_state_close(dump_state *ds) {
  if (ds->emitter_live) yaml_emitter_delete(&ds->emitter);
  free(ds->buf);
  ds->emitter_live = 0;
  ds->buf = NULL;
}

static int dumper_gc(lua_State *L) {
  dump_state_close(luaL_checkudata(L, 1, DUMPER_MT));
  return 0;
}

static int write_handler(void *data, unsigned char *chunk, size_t size) {
  dump_state *ds = data;
  if (size > ds->cap - ds->len) {
    size_t cap = ds->cap ? ds->cap : 4096;
    char *p;
    while (cap - ds->len < size) cap *= 2;
    if (!(p = realloc(ds->buf, cap))) return 0;
    ds->buf = p;
    ds->cap = cap;
  }
  memcpy(ds->buf + ds->len, chunk, size);
  ds->len += size;
  return 1;
}

static int dump_error(dumper *d, const char *fmt, ...) {
  lua_State *L = d->L;
  va_list ap;
  int top = lua_gettop(L);
  luaL_checkstack(L, 2 * PATH_SHOWN + 8, NULL);
  lua_pushliteral(L, "yaml.dump: ");
  va_start(ap, fmt);
  lua_pushvfstring(L, fmt, ap);
  va_end(ap);
  lua_pushliteral(L, " at $");
  for (int k = 0; k < d->depth; k++) {
    const path_entry *e = &d->path[k];
    if (k >= PATH_SHOWN && k < d->depth - PATH_SHOWN) {
      lua_pushliteral(L, "...");
      k = d->depth - PATH_SHOWN - 1;
      continue;
    }
    if (!e->key_idx)
      lua_pushfstring(L, "[%I]", e->index);
    else if (lua_type(L, e->key_idx) == LUA_TSTRING)
      lua_pushfstring(L, ".%s", lua_tostring(L, e->key_idx));
    else {
      luaL_tolstring(L, e->key_idx, NULL);
      lua_pushfstring(L, "[%s]", lua_tostring(L, -1));
      lua_remove(L, -2);
    }
  }
  lua_concat(L, lua_gettop(L) - top);
  return lua_error(L);
}

static void emit(dumper *d, yaml_event_t *ev) {
  if (!yaml_emitter_emit(&d->ds->emitter, ev))
    dump_error(d, "%s", d->ds->emitter.problem ? d->ds->emitter.problem : "out of memory");
}

static void emit_scalar(dumper *d, const char *s, size_t n, yaml_scalar_style_t style) {
  yaml_event_t ev;
  if (!yaml_scalar_event_initialize(&ev, NULL, NULL, (yaml_char_t *)s, (int)n, 1, 1, style))
    dump_error(d, "out of memory");
  emit(d, &ev);
}

static int valid_utf8(const unsigned char *s, size_t n) {
  size_t k = 0;
  while (k < n) {
    unsigned c = s[k];
    size_t extra;
    unsigned min, cp;
    if (c < 0x80) { k++; continue; }
    if ((c & 0xE0) == 0xC0) extra = 1, min = 0x80, cp = c & 0x1F;
    else if ((c & 0xF0) == 0xE0) extra = 2, min = 0x800, cp = c & 0x0F;
    else if ((c & 0xF8) == 0xF0) extra = 3, min = 0x10000, cp = c & 0x07;
    else return 0;
    if (n - k <= extra) return 0;
    for (size_t j = 1; j <= extra; j++) {
      if ((s[k + j] & 0xC0) != 0x80) return 0;
      cp = (cp << 6) | (s[k + j] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    k += extra + 1;
  }
  return 1;
}

/* Would this string, written plain, be read back (by us, PyYAML, or a YAML 1.2 reader) as something else? */
static int needs_quotes(const char *s, size_t n) {
  static const char *const more[] = {"y", "Y", "n", "N", "=", NULL};
  scalar_value v;
  char *end;
  resolve_plain(s, n, &v);
  if (v.type != SV_STR || equals_any(s, n, more)) return 1;
  if (n >= 2 && s[0] == '0' && s[1] == 'o') return 1;
  if (n >= 5 && is_digit(s[0]) && is_digit(s[1]) && is_digit(s[2]) && is_digit(s[3]) && s[4] == '-')
    return 1; /* a timestamp to PyYAML */
  strtod(s, &end);
  return end == s + n;
}

static void emit_string(dumper *d, int idx) {
  size_t n;
  const char *s = lua_tolstring(d->L, idx, &n);
  yaml_scalar_style_t style = YAML_ANY_SCALAR_STYLE;
  if (!valid_utf8((const unsigned char *)s, n)) dump_error(d, "string is not valid UTF-8");
  if (n > 0x7FFFFFFF) dump_error(d, "string is longer than 2 GB");
  if (needs_quotes(s, n))
    style = YAML_SINGLE_QUOTED_SCALAR_STYLE;
  else if (memchr(s, '\n', n))
    style = YAML_LITERAL_SCALAR_STYLE;
  emit_scalar(d, s, n, style);
}

static void emit_number(dumper *d, int idx) {
  char buf[64];
  lua_State *L = d->L;
  if (lua_isinteger(L, idx)) {
    snprintf(buf, sizeof buf, LUA_INTEGER_FMT, (LUAI_UACINT)lua_tointeger(L, idx));
  } else {
    double x = (double)lua_tonumber(L, idx);
    if (isnan(x)) {
      strcpy(buf, ".nan");
    } else if (isinf(x)) {
      strcpy(buf, x > 0 ? ".inf" : "-.inf");
    } else {
      for (int prec = 15; prec <= 17; prec++) {
        snprintf(buf, sizeof buf, "%.*g", prec, x);
        if (strtod(buf, NULL) == x) break;
      }
      if (!strchr(buf, '.')) { /* YAML 1.1 floats need a dot: 1e+20 -> 1.0e+20, 3 -> 3.0 */
        char *e = strchr(buf, 'e');
        size_t at = e ? (size_t)(e - buf) : strlen(buf);
        memmove(buf + at + 2, buf + at, strlen(buf + at) + 1);
        memcpy(buf + at, ".0", 2);
      }
    }
  }
  emit_scalar(d, buf, strlen(buf), YAML_PLAIN_SCALAR_STYLE);
}

typedef struct {
  int rank; /* null, booleans, numbers, strings */
  int isint;
  lua_Integer i;
  lua_Number x;
  const char *s;
  size_t len;
  lua_Integer slot;
} key_entry;

static int compare_keys(const void *pa, const void *pb) {
  const key_entry *a = pa, *b = pb;
  if (a->rank != b->rank) return a->rank < b->rank ? -1 : 1;
  if (a->rank == 2) {
    if (a->isint && b->isint) return a->i < b->i ? -1 : a->i > b->i;
    return a->x < b->x ? -1 : a->x > b->x;
  }
  if (a->rank == 1) return a->i < b->i ? -1 : a->i > b->i;
  if (a->rank == 3) {
    int c = memcmp(a->s, b->s, a->len < b->len ? a->len : b->len);
    if (c) return c;
    return a->len < b->len ? -1 : a->len > b->len;
  }
  return 0;
}

static int has_metatable(lua_State *L, int idx, const char *tname) {
  int yes = 0;
  if (lua_getmetatable(L, idx)) {
    luaL_getmetatable(L, tname);
    yes = lua_rawequal(L, -1, -2);
    lua_pop(L, 2);
  }
  return yes;
}

static void emit_value(dumper *d, int idx);

static void emit_mapping(dumper *d, int t, lua_Integer count) {
  lua_State *L = d->L;
  yaml_event_t ev;
  key_entry *keys = lua_newuserdatauv(L, (size_t)count * sizeof *keys + 1, 0);
  int keys_ud = lua_gettop(L);
  lua_Integer k = 0;
  lua_createtable(L, (int)count, 0);
  lua_pushnil(L);
  while (lua_next(L, t)) {
    key_entry *e = &keys[k];
    lua_pop(L, 1);
    e->slot = ++k;
    switch (lua_type(L, -1)) {
      case LUA_TSTRING: e->rank = 3, e->s = lua_tolstring(L, -1, &e->len); break;
      case LUA_TNUMBER:
        e->rank = 2, e->isint = lua_isinteger(L, -1);
        e->i = lua_tointeger(L, -1), e->x = lua_tonumber(L, -1);
        break;
      case LUA_TBOOLEAN: e->rank = 1, e->i = lua_toboolean(L, -1); break;
      default:
        if (lua_type(L, -1) == LUA_TLIGHTUSERDATA && lua_touserdata(L, -1) == NULL) {
          e->rank = 0;
          break;
        }
        d->path[d->depth].key_idx = lua_gettop(L);
        d->depth++;
        dump_error(d, "a mapping key cannot be a %s", luaL_typename(L, -1));
    }
    lua_pushvalue(L, -1);
    lua_rawseti(L, keys_ud + 1, e->slot); /* keeps string keys alive while sorted */
  }
  qsort(keys, (size_t)count, sizeof *keys, compare_keys);
  if (!yaml_mapping_start_event_initialize(&ev, NULL, NULL, 1, YAML_ANY_MAPPING_STYLE))
    dump_error(d, "out of memory");
  emit(d, &ev);
  for (k = 0; k < count; k++) {
    lua_rawgeti(L, keys_ud + 1, keys[k].slot);
    d->path[d->depth].key_idx = lua_gettop(L);
    d->depth++;
    emit_value(d, lua_gettop(L));
    lua_pushvalue(L, -1);
    lua_rawget(L, t);
    emit_value(d, lua_gettop(L));
    d->depth--;
    lua_pop(L, 2);
  }
  yaml_mapping_end_event_initialize(&ev);
  emit(d, &ev);
  lua_pop(L, 2);
}

static void emit_table(dumper *d, int t) {
  lua_State *L = d->L;
  yaml_event_t ev;
  lua_Integer count = 0, max = 0;
  int all_int = 1, as_array = has_metatable(L, t, ARRAY_MT);
  if (d->depth >= MAX_DEPTH) dump_error(d, "nesting is deeper than %d levels", MAX_DEPTH);
  luaL_checkstack(L, 12, "yaml.dump nesting");
  lua_pushvalue(L, t);
  if (lua_rawget(L, d->visiting) != LUA_TNIL) dump_error(d, "a table contains itself");
  lua_pop(L, 1);
  lua_pushvalue(L, t);
  lua_pushboolean(L, 1);
  lua_rawset(L, d->visiting);
  lua_pushnil(L);
  while (lua_next(L, t)) {
    lua_pop(L, 1);
    count++;
    if (lua_isinteger(L, -1) && lua_tointeger(L, -1) >= 1) {
      if (lua_tointeger(L, -1) > max) max = lua_tointeger(L, -1);
    } else {
      all_int = 0;
    }
  }
  if (as_array && count > 0 && !(all_int && max == count))
    dump_error(d, "a table marked as an array has keys other than 1..n");
  if (as_array || (count > 0 && all_int && max == count && !has_metatable(L, t, OBJECT_MT))) {
    if (!yaml_sequence_start_event_initialize(&ev, NULL, NULL, 1, YAML_ANY_SEQUENCE_STYLE))
      dump_error(d, "out of memory");
    emit(d, &ev);
    for (lua_Integer k = 1; k <= count; k++) {
      lua_rawgeti(L, t, k);
      d->path[d->depth].key_idx = 0;
      d->path[d->depth].index = k;
      d->depth++;
      emit_value(d, lua_gettop(L));
      d->depth--;
      lua_pop(L, 1);
    }
    yaml_sequence_end_event_initialize(&ev);
    emit(d, &ev);
  } else {
    emit_mapping(d, t, count);
  }
  lua_pushvalue(L, t);
  lua_pushnil(L);
  lua_rawset(L, d->visiting);
}

static void emit_value(dumper *d, int idx) {
  lua_State *L = d->L;
  switch (lua_type(L, idx)) {
    case LUA_TNIL: emit_scalar(d, "null", 4, YAML_PLAIN_SCALAR_STYLE); break;
    case LUA_TBOOLEAN:
      if (lua_toboolean(L, idx)) emit_scalar(d, "true", 4, YAML_PLAIN_SCALAR_STYLE);
      else emit_scalar(d, "false", 5, YAML_PLAIN_SCALAR_STYLE);
      break;
    case LUA_TNUMBER: emit_number(d, idx); break;
    case LUA_TSTRING: emit_string(d, idx); break;
    case LUA_TTABLE: emit_table(d, idx); break;
    case LUA_TLIGHTUSERDATA:
      if (lua_touserdata(L, idx) == NULL) {
        emit_scalar(d, "null", 4, YAML_PLAIN_SCALAR_STYLE);
        break;
      }
      /* fallthrough */
    default: dump_error(d, "cannot dump a %s", luaL_typename(L, idx));
  }
}

/* yaml.dump(value) -> string; raises on values YAML cannot hold (functions, cycles, ...) */
static int l_dump(lua_State *L) {
  dump_state *ds;
  dumper *d;
  yaml_event_t ev;
  luaL_checkany(L, 1);
  lua_settop(L, 1);
  ds = lua_newuserdatauv(L, sizeof *ds, 0);
  memset(ds, 0, sizeof *ds);
  luaL_setmetatable(L, DUMPER_MT);
  d = lua_newuserdatauv(L, sizeof *d, 0);
  d->L = L;
  d->ds = ds;
  d->depth = 0;
  lua_newtable(L);
  d->visiting = lua_gettop(L);
  if (!yaml_emitter_initialize(&ds->emitter)) return luaL_error(L, "out of memory");
  ds->emitter_live = 1;
  yaml_emitter_set_output(&ds->emitter, write_handler, ds);
  yaml_emitter_set_unicode(&ds->emitter, 1);
  yaml_emitter_set_width(&ds->emitter, -1);
  yaml_stream_start_event_initialize(&ev, YAML_UTF8_ENCODING);
  emit(d, &ev);
  yaml_document_start_event_initialize(&ev, NULL, NULL, NULL, 1);
  emit(d, &ev);
  emit_value(d, 1);
  yaml_document_end_event_initialize(&ev, 1);
  emit(d, &ev);
  yaml_stream_end_event_initialize(&ev);
  emit(d, &ev);
  if (!yaml_emitter_flush(&ds->emitter)) dump_error(d, "out of memory");
  /* A top-level plain scalar gets an explicit document end marker; it adds nothing. */
  if (ds->len >= 5 && memcmp(ds->buf + ds->len - 5, "\n...\n", 5) == 0) ds->len -= 4;
  lua_pushlstring(L, ds->buf ? ds->buf : "", ds->len);
  dump_state_close(ds);
  return 1;
}

/* ---------------------------------------------------------------- module */

static const luaL_Reg yaml_functions[] = {
    {"load", l_load}, {"load_all", l_load_all}, {"load_file", l_load_file}, {"dump", l_dump},
    {"key_order", l_key_order}, {NULL, NULL}};

int luaopen_ops_core_yaml(lua_State *L) {
  if (luaL_getsubtable(L, LUA_REGISTRYINDEX, KEY_ORDER) == 0) {
    lua_createtable(L, 0, 1);
    lua_pushliteral(L, "k");
    lua_setfield(L, -2, "__mode");
    lua_setmetatable(L, -2);
  }
  lua_pop(L, 1);
  luaL_newmetatable(L, LOADER_MT);
  lua_pushcfunction(L, loader_gc);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, loader_gc);
  lua_setfield(L, -2, "__close");
  luaL_newmetatable(L, DUMPER_MT);
  lua_pushcfunction(L, dumper_gc);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, dumper_gc);
  lua_setfield(L, -2, "__close");
  lua_pop(L, 2);
  luaL_newlib(L, yaml_functions);
  /* The same value as cjson.null, so JSON and YAML nulls compare equal. */
  lua_pushlightuserdata(L, NULL);
  lua_setfield(L, -2, "null");
  luaL_newmetatable(L, ARRAY_MT);
  lua_setfield(L, -2, "array_mt");
  luaL_newmetatable(L, OBJECT_MT);
  lua_setfield(L, -2, "object_mt");
  return 1;
}
