#include "data/split_regex.h"

#include "core/error.h"

#ifdef SSD_HAVE_PCRE2
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#endif

namespace ssd {

#ifdef SSD_HAVE_PCRE2

struct SplitRegex::Impl {
  pcre2_code* code = nullptr;
};

bool have_split_regex() { return true; }

SplitRegex::SplitRegex(const std::string& pattern, const std::string& origin)
    : impl_(std::make_unique<Impl>()) {
  int err = 0;
  PCRE2_SIZE at = 0;
  impl_->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                              PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &err, &at, nullptr);
  if (!impl_->code) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof msg);
    fail(origin, ": split pattern does not compile at offset ", at, ": ",
         reinterpret_cast<const char*>(msg), " (pattern ", pattern, ")");
  }
  // JIT is an optimisation only; without it the interpreter gives the same matches.
  pcre2_jit_compile(impl_->code, PCRE2_JIT_COMPLETE);
}

SplitRegex::~SplitRegex() {
  if (impl_ && impl_->code) pcre2_code_free(impl_->code);
}

void SplitRegex::find_all(std::string_view text,
                          std::vector<std::pair<size_t, size_t>>& out) const {
  // Match data holds the per-call state, so one compiled pattern serves every thread.
  thread_local struct Data {
    pcre2_match_data* md = pcre2_match_data_create(4, nullptr);
    ~Data() { pcre2_match_data_free(md); }
  } data;
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  size_t start = 0;
  while (start < text.size()) {
    const int rc = pcre2_match(impl_->code, subject, text.size(), start, 0, data.md, nullptr);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(rc, msg, sizeof msg);
      fail("split pattern: matching failed at byte ", start, ": ",
           reinterpret_cast<const char*>(msg));
    }
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(data.md);
    size_t b = ov[0], e = ov[1];
    if (e > b) {
      out.emplace_back(b, e);
      start = e;
    } else {
      // An empty match: step over one character (UTF-8 lead byte and its continuations).
      start = b + 1;
      while (start < text.size() && (static_cast<unsigned char>(text[start]) & 0xC0) == 0x80)
        ++start;
    }
  }
}

#else  // no PCRE2

struct SplitRegex::Impl {};

bool have_split_regex() { return false; }

SplitRegex::SplitRegex(const std::string& pattern, const std::string& origin) {
  fail(origin, ": this ssdtrain was built without PCRE2 (Debian/Ubuntu package libpcre2-dev), "
       "which the tokenizer's Unicode split pattern needs; install it and rebuild");
}

SplitRegex::~SplitRegex() = default;

void SplitRegex::find_all(std::string_view, std::vector<std::pair<size_t, size_t>>&) const {}

#endif

}  // namespace ssd
