#pragma once
#define KVQ_VERSION_MAJOR 0
#define KVQ_VERSION_MINOR 1
#define KVQ_VERSION_PATCH 0

namespace kvq {
inline constexpr const char* version() { return "0.1.0"; }
}  // namespace kvq
