// Errors: one exception type that carries a message meant for the user.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace ssd {

// Thrown for every user-facing failure (bad config, missing file, bad checkpoint).
// main() prints what() and exits non-zero; nothing else should catch it silently.
// all_ranks: every rank of the job threw this same error (a config or layout error found before
// any work), so one rank printing it is enough.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& msg, bool all_ranks = false)
      : std::runtime_error(msg), all_ranks_(all_ranks) {}
  bool all_ranks() const { return all_ranks_; }

 private:
  bool all_ranks_;
};

namespace detail {
inline void append(std::ostringstream&) {}
template <class T, class... Rest>
void append(std::ostringstream& os, const T& v, const Rest&... rest) {
  os << v;
  append(os, rest...);
}
}  // namespace detail

template <class... Args>
[[noreturn]] void fail(const Args&... args) {
  std::ostringstream os;
  detail::append(os, args...);
  throw Error(os.str());
}

// The same, for an error every rank of the job finds identically (its message printed once).
template <class... Args>
[[noreturn]] void fail_all(const Args&... args) {
  std::ostringstream os;
  detail::append(os, args...);
  throw Error(os.str(), true);
}

}  // namespace ssd

// Internal invariant: a failure is a bug in ssdtrain, not in the user's input.
#define SSD_CHECK(cond, ...)                                                        \
  do {                                                                              \
    if (!(cond)) ::ssd::fail("internal check failed: " #cond " (", __FILE__, ":",   \
                             __LINE__, ") ", ##__VA_ARGS__);                        \
  } while (0)
