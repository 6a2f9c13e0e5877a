// skip-collections: a tidegate `filter` plugin in C.
//
// Drops every event on a collection whose name starts with the configured prefix (scratch and
// temporary collections), keeps everything else. Config:
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

// Reads the configuration once. Returns false (with `err` set) when it is invalid.
static bool load_config(filter_plugin_error_t *err) {
  if (skip_prefix != NULL) {
    return true;
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
