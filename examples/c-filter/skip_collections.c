// skip-collections: a tidegate `filter` plugin in C.
//
// Drops every event on a collection whose name starts with the configured prefix (scratch and
// temporary collections), keeps everything else. Config (any other key is refused):
//   skip-prefix   the prefix (default "tmp_"); must not be empty.
//
// Bindings in bindings/ are generated from the WIT contract by `wit-bindgen c --world filter
// wit/plugin-0.1` (wit-bindgen-cli 0.63) and committed, so building needs only clang and
// wasm-tools. Build: see build.sh next to this file.

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "bindings/filter.h"

static char *skip_prefix = NULL;
static size_t skip_prefix_len = 0;

static void log_line(tidegate_plugin_log_level_t level, const char *text) {
  filter_string_t message;
  filter_string_set(&message, text);
  tidegate_plugin_log_write(level, &message);
}

static void set_error(filter_plugin_error_t *err, uint8_t tag, const char *text) {
  err->tag = tag;
  // The host frees what the guest returns, so the message must be heap-allocated.
  filter_string_dup(&err->val.failed, text);
}

// Refuses any configured key but `skip-prefix`: a misspelt key must never be ignored silently
// (`skip-prefx = "scratch_"` would otherwise keep every scratch collection's events).
static bool check_keys(filter_plugin_error_t *err) {
  filter_list_tuple2_string_string_t entries;
  tidegate_plugin_config_entries(&entries);
  static const char known[] = "skip-prefix";
  bool ok = true;
  for (size_t i = 0; i < entries.len && ok; i++) {
    filter_string_t *key = &entries.ptr[i].f0;
    if (key->len == sizeof(known) - 1 && memcmp(key->ptr, known, key->len) == 0) {
      continue;
    }
    // Built by hand: snprintf would pull in stdio, which needs WASI imports.
    static const char before[] = "unknown config key `", after[] = "` (known keys: `skip-prefix`)";
    size_t len = sizeof(before) - 1 + key->len + sizeof(after) - 1;
    char *text = malloc(len + 1);
    if (text == NULL) {
      abort();
    }
    memcpy(text, before, sizeof(before) - 1);
    memcpy(text + sizeof(before) - 1, key->ptr, key->len);
    memcpy(text + sizeof(before) - 1 + key->len, after, sizeof(after));  // with its NUL
    set_error(err, TIDEGATE_PLUGIN_TYPES_PLUGIN_ERROR_INVALID_CONFIG, text);
    free(text);
    ok = false;
  }
  filter_list_tuple2_string_string_free(&entries);
  return ok;
}

// Reads the configuration once. Returns false (with `err` set) when it is invalid.
static bool load_config(filter_plugin_error_t *err) {
  if (skip_prefix != NULL) {
    return true;
  }
  if (!check_keys(err)) {
    return false;
  }
  filter_string_t key, value;
  filter_string_set(&key, "skip-prefix");
  if (tidegate_plugin_config_get(&key, &value)) {
    if (value.len == 0) {
      filter_string_free(&value);
      set_error(err, TIDEGATE_PLUGIN_TYPES_PLUGIN_ERROR_INVALID_CONFIG,
                "`skip-prefix` must not be empty");
      return false;
    }
    skip_prefix = (char *)value.ptr;  // keep the host's copy for the instance's lifetime
    skip_prefix_len = value.len;
  } else {
    skip_prefix = strdup("tmp_");
    skip_prefix_len = strlen(skip_prefix);
  }
  return true;
}

bool exports_filter_init(filter_plugin_error_t *err) {
  if (!load_config(err)) {
    return false;
  }
  log_line(TIDEGATE_PLUGIN_LOG_LEVEL_DEBUG, "skip-collections configured");
  return true;
}

bool exports_filter_filter(filter_change_event_t *event, bool *ret, filter_plugin_error_t *err) {
  if (!load_config(err)) {
    filter_change_event_free(event);
    return false;
  }
  bool keep = true;
  if (event->namespace_.coll.is_some) {
    filter_string_t *coll = &event->namespace_.coll.val;
    if (coll->len >= skip_prefix_len && memcmp(coll->ptr, skip_prefix, skip_prefix_len) == 0) {
      keep = false;
    }
  }
  // Arguments of an export belong to the callee.
  filter_change_event_free(event);
  *ret = keep;
  return true;
}
