// dwa/json.hpp: strict JSON that agrees with Python's json module (header-only, C++17).
//
// parse() accepts exactly the texts that Python's json.loads() accepts (strict
// mode, the default) after decoding the bytes as UTF-8 strictly, and dump()
// writes exactly what json.dumps() writes for the same value (separators ", "
// and ": ", ensure_ascii=True, NaN/Infinity/-Infinity for non-finite floats).
// Checkpoints written by Python, NumPy or C++ therefore read back the same
// everywhere, and a text one side rejects the other rejects too
// (tests/test_json_cpp.py runs tests/json_corpus/ and a differential fuzz).
//
//     dwa::json::Options options;
//     options.prefix = "malformed DWA history state_dict: ";     // in front of every error message
//     const dwa::json::Value state = dwa::json::parse(text, options);  // throws dwa::json::ParseError
//     if (const dwa::json::Value* k = state.find("num_tasks"))
//       std::optional<std::int64_t> K = k->as_int64();         // nullopt unless an Int that fits
//     std::string same = dwa::json::dump(state);                // == json.dumps(json.loads(text))
//
// What Python accepts, and so this parser:
//   - numbers: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][-+]?[0-9]+)?; nothing else (".5",
//     "1.", "01", "+1", "1e" are errors). A literal without '.', 'e' or 'E' is an
//     Int (Python int), kept exactly as its text, however long, up to
//     Options::max_integer_digits digits (Python's int_max_str_digits, 4300 by
//     default: json.loads raises ValueError beyond it); "-0" is Int zero. Any
//     other literal is a Float, correctly rounded like Python's float():
//     1e400 is inf and 1e-400 is 0.0, as in Python.
//   - NaN, Infinity, -Infinity (Floats), true, false, null.
//   - strings: escapes \" \\ \/ \b \f \n \r \t \uXXXX (hex digits of either
//     case); an escaped surrogate pair is one character; no raw character
//     below U+0020 (tab and newline included) inside a string.
//   - whitespace between tokens: space, tab, newline, carriage return only.
//   - the whole input must be valid UTF-8 (Python decodes before parsing),
//     must not start with a byte order mark (json.loads refuses one), and must
//     hold exactly one value.
//   - duplicate keys in an object: the last value wins, at the position where
//     the key first appeared (a Python dict). Value::members never holds a key twice.
//
// Lone surrogates: Python accepts "\ud800" (an escape of one half of a
// surrogate pair) into a str that cannot be encoded as UTF-8. To agree with it,
// parse() keeps such a code point in Value::text as its 3-byte generalized
// UTF-8 form (ED A0 80 to ED BF BF, as WTF-8 does), and dump() writes it back
// as the same \udXXX escape. Such a string is not valid UTF-8: is_utf8() tells,
// and a format that wants UTF-8 text (e.g. the DWA state) rejects it there.
//
// Where the two sides differ on purpose: nesting deeper than
// Options::max_depth (256) is an error here; Python raises RecursionError
// somewhere near sys.getrecursionlimit() (about 1000) instead. A JSON text
// nested 100,000 deep is a clean ParseError, never a stack overflow.
//
// Errors: ParseError (a std::invalid_argument) with the message
//     Options::prefix + "not valid JSON (<what> at offset <byte offset>)"
// and the pieces in ParseError::reason and ParseError::offset.

#pragma once

#include <charconv>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <unordered_map>
#include <utility>
#include <vector>

namespace dwa::json {

struct Options {
  // Deepest nesting of arrays and objects accepted (256: "[[...]]" 256 deep is fine, 257 is not).
  std::size_t max_depth = 256;
  // Longest integer literal accepted, in digits; Python's default int_max_str_digits. 0: no limit.
  std::size_t max_integer_digits = 4300;
  // Put in front of every error message, e.g. "malformed DWA history state_dict: ".
  std::string prefix;
};

class ParseError : public std::invalid_argument {
 public:
  ParseError(const std::string& prefix, const std::string& what, std::size_t where)
      : std::invalid_argument(prefix + "not valid JSON (" + what + " at offset " + std::to_string(where) + ")"),
        reason(what),
        offset(where) {}
  std::string reason;  // e.g. "invalid control character in string"
  std::size_t offset;  // in bytes from the start of the text
};

// One JSON value, shaped like what json.loads returns. Parsed values nest at
// most Options::max_depth deep; copying and destroying are recursive, so do not
// build values nested thousands deep by hand.
struct Value {
  enum class Kind { Null, Bool, Int, Float, String, Array, Object };
  using Member = std::pair<std::string, Value>;

  Kind kind = Kind::Null;
  bool boolean = false;          // Bool
  double number = 0.0;           // Float: the value (may be NaN or +-inf). Int: unused, see as_double()
  std::string text;              // String: its UTF-8 (lone surrogates as ED xx xx); Int/Float: the literal as written
  std::vector<Value> items;      // Array
  std::vector<Member> members;   // Object: unique keys, in order of first appearance

  static Value from_bool(bool value) {
    Value v;
    v.kind = Kind::Bool;
    v.boolean = value;
    return v;
  }
  static Value from_int(std::int64_t value) {
    Value v;
    v.kind = Kind::Int;
    v.text = std::to_string(value);
    return v;
  }
  static Value from_uint(std::uint64_t value) {
    Value v;
    v.kind = Kind::Int;
    v.text = std::to_string(value);
    return v;
  }
  static Value from_double(double value) {
    Value v;
    v.kind = Kind::Float;
    v.number = value;
    return v;
  }
  static Value from_string(std::string value) {
    Value v;
    v.kind = Kind::String;
    v.text = std::move(value);
    return v;
  }
  static Value array(std::vector<Value> items = {}) {
    Value v;
    v.kind = Kind::Array;
    v.items = std::move(items);
    return v;
  }
  // The keys must be unique (dump() writes them all, as given).
  static Value object(std::vector<Member> members = {}) {
    Value v;
    v.kind = Kind::Object;
    v.members = std::move(members);
    return v;
  }

  bool is_null() const { return kind == Kind::Null; }
  bool is_number() const { return kind == Kind::Int || kind == Kind::Float; }

  // The member's value, or nullptr (also for a non-object).
  const Value* find(std::string_view key) const {
    for (const auto& member : members)
      if (member.first == key) return &member.second;
    return nullptr;
  }

  // An Int's value if it fits (Python: -2**63 <= v < 2**63); nullopt otherwise or for a non-Int.
  std::optional<std::int64_t> as_int64() const {
    if (kind != Kind::Int) return std::nullopt;
    std::int64_t out = 0;
    const char* first = text.data();
    const char* last = first + text.size();
    const auto result = std::from_chars(first, last, out);
    if (result.ec != std::errc() || result.ptr != last) return std::nullopt;
    return out;
  }
  // An Int's value if it fits (0 <= v < 2**64; "-0" is 0); nullopt otherwise or for a non-Int.
  std::optional<std::uint64_t> as_uint64() const {
    if (kind != Kind::Int) return std::nullopt;
    std::string_view digits = text;
    if (!digits.empty() && digits[0] == '-') {
      if (digits != "-0") return std::nullopt;
      return 0;
    }
    std::uint64_t out = 0;
    const auto result = std::from_chars(digits.data(), digits.data() + digits.size(), out);
    if (result.ec != std::errc() || result.ptr != digits.data() + digits.size()) return std::nullopt;
    return out;
  }
  // Python's float(v): a Float's value, or an Int correctly rounded; nullopt for
  // an Int beyond the double range (Python raises OverflowError) or a non-number.
  std::optional<double> as_double() const {
    if (kind == Kind::Float) return number;
    if (kind != Kind::Int) return std::nullopt;
    double out = 0.0;
    const char* first = text.data();
    const auto result = std::from_chars(first, first + text.size(), out);
    if (result.ec != std::errc() || result.ptr != first + text.size()) return std::nullopt;
    return out == 0.0 ? 0.0 : out;  // "-0" is Python's int 0, and float(0) is 0.0
  }
};

namespace detail {

// Length of the valid UTF-8 sequence at s[i] (Unicode's table 3-7, which is
// what Python's strict decoder accepts), or 0 if invalid. With
// allow_surrogates, ED A0..BF xx (a lone surrogate, see above) is accepted too.
inline std::size_t utf8_sequence(std::string_view s, std::size_t i, bool allow_surrogates = false) {
  const auto byte = [&](std::size_t k) { return static_cast<unsigned char>(s[k]); };
  const auto continuation = [&](std::size_t k, unsigned lo = 0x80, unsigned hi = 0xBF) {
    return k < s.size() && byte(k) >= lo && byte(k) <= hi;
  };
  const unsigned c = byte(i);
  if (c < 0x80) return 1;
  if (c >= 0xC2 && c <= 0xDF) return continuation(i + 1) ? 2 : 0;
  if (c >= 0xE0 && c <= 0xEF) {
    const unsigned lo = c == 0xE0 ? 0xA0 : 0x80;
    const unsigned hi = c == 0xED && !allow_surrogates ? 0x9F : 0xBF;
    return continuation(i + 1, lo, hi) && continuation(i + 2) ? 3 : 0;
  }
  if (c >= 0xF0 && c <= 0xF4) {
    const unsigned lo = c == 0xF0 ? 0x90 : 0x80;
    const unsigned hi = c == 0xF4 ? 0x8F : 0xBF;
    return continuation(i + 1, lo, hi) && continuation(i + 2) && continuation(i + 3) ? 4 : 0;
  }
  return 0;
}

// Offset of the first byte that is not valid UTF-8, or npos.
inline std::size_t invalid_utf8_at(std::string_view s, bool allow_surrogates = false) {
  for (std::size_t i = 0; i < s.size();) {
    const std::size_t n = utf8_sequence(s, i, allow_surrogates);
    if (n == 0) return i;
    i += n;
  }
  return std::string_view::npos;
}

// Decodes the (already validated) sequence of length n at s[i].
inline std::uint32_t decode_utf8(std::string_view s, std::size_t i, std::size_t n) {
  const auto byte = [&](std::size_t k) { return static_cast<std::uint32_t>(static_cast<unsigned char>(s[k])); };
  switch (n) {
    case 1: return byte(i);
    case 2: return ((byte(i) & 0x1F) << 6) | (byte(i + 1) & 0x3F);
    case 3: return ((byte(i) & 0x0F) << 12) | ((byte(i + 1) & 0x3F) << 6) | (byte(i + 2) & 0x3F);
    default:
      return ((byte(i) & 0x07) << 18) | ((byte(i + 1) & 0x3F) << 12) | ((byte(i + 2) & 0x3F) << 6) |
             (byte(i + 3) & 0x3F);
  }
}

// Appends code point cp (surrogates included, as 3 bytes) as generalized UTF-8.
inline void append_utf8(std::string& out, std::uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

inline void append_hex4(std::string& out, std::uint32_t unit, const char* escape) {
  static const char digits[] = "0123456789abcdef";
  out += escape;
  for (int shift = 12; shift >= 0; shift -= 4) out += digits[(unit >> shift) & 0xF];
}

inline bool is_digit(char c) { return c >= '0' && c <= '9'; }

inline int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

class Parser {
 public:
  Parser(std::string_view text, const Options& options) : s_(text), options_(options) {}

  Value parse() {
    // Python decodes the bytes before it parses, so any invalid byte is an
    // error wherever it is; json.loads also refuses a leading BOM.
    const std::size_t bad = invalid_utf8_at(s_);
    if (bad != std::string_view::npos) fail("invalid UTF-8", bad);
    if (s_.substr(0, 3) == "\xEF\xBB\xBF") fail("unexpected UTF-8 byte order mark", 0);
    skip_space();
    Value value = parse_value(0);
    skip_space();
    if (pos_ != s_.size()) fail("extra data after the value", pos_);
    return value;
  }

 private:
  [[noreturn]] void fail(const std::string& reason, std::size_t offset) const {
    throw ParseError(options_.prefix, reason, offset);
  }
  bool at_end() const { return pos_ >= s_.size(); }
  void skip_space() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r')) ++pos_;
  }
  bool consume(std::string_view word) {
    if (s_.substr(pos_, word.size()) != word) return false;
    pos_ += word.size();
    return true;
  }

  Value parse_value(std::size_t depth) {
    if (at_end()) fail("expected a value, got the end of the text", pos_);
    switch (s_[pos_]) {
      case '{':
      case '[':
        // Checked before descending: the recursion depth is what bounds the stack.
        if (depth >= options_.max_depth)
          fail("nesting deeper than " + std::to_string(options_.max_depth) + " arrays and objects", pos_);
        return s_[pos_] == '{' ? parse_object(depth + 1) : parse_array(depth + 1);
      case '"': {
        Value value;
        value.kind = Value::Kind::String;
        value.text = parse_string();
        return value;
      }
      case 'n':
        if (consume("null")) return Value();
        break;
      case 't':
        if (consume("true")) return Value::from_bool(true);
        break;
      case 'f':
        if (consume("false")) return Value::from_bool(false);
        break;
      // The constants Python's json module reads and writes for non-finite floats.
      case 'N':
        if (consume("NaN")) return constant("NaN", std::numeric_limits<double>::quiet_NaN());
        break;
      case 'I':
        if (consume("Infinity")) return constant("Infinity", std::numeric_limits<double>::infinity());
        break;
      case '-':
        if (consume("-Infinity")) return constant("-Infinity", -std::numeric_limits<double>::infinity());
        return parse_number();
      default:
        if (is_digit(s_[pos_])) return parse_number();
    }
    fail("expected a value", pos_);
  }

  static Value constant(const char* text, double number) {
    Value value = Value::from_double(number);
    value.text = text;
    return value;
  }

  Value parse_array(std::size_t depth) {
    Value value = Value::array();
    ++pos_;  // '['
    skip_space();
    if (pos_ < s_.size() && s_[pos_] == ']') {
      ++pos_;
      return value;
    }
    while (true) {
      skip_space();
      value.items.push_back(parse_value(depth));
      skip_space();
      if (consume(",")) continue;  // a value must follow: "[1,]" fails in parse_value
      if (consume("]")) return value;
      fail("expected ',' or ']'", pos_);
    }
  }

  Value parse_object(std::size_t depth) {
    Value value = Value::object();
    // Key -> index into members, built once an object is big enough for the
    // linear search to cost more than the map (duplicate keys: last value wins).
    std::unordered_map<std::string, std::size_t> index;
    ++pos_;  // '{'
    skip_space();
    if (pos_ < s_.size() && s_[pos_] == '}') {
      ++pos_;
      return value;
    }
    while (true) {
      skip_space();
      if (at_end() || s_[pos_] != '"') fail("expected a string key in double quotes", pos_);
      std::string key = parse_string();
      skip_space();
      if (!consume(":")) fail("expected ':'", pos_);
      skip_space();
      Value item = parse_value(depth);
      auto& members = value.members;
      std::size_t found = members.size();
      if (index.empty()) {
        for (std::size_t i = 0; i < members.size(); ++i)
          if (members[i].first == key) found = i;
      } else if (const auto it = index.find(key); it != index.end()) {
        found = it->second;
      }
      if (found < members.size()) {
        members[found].second = std::move(item);
      } else {
        if (!index.empty()) index.emplace(key, members.size());
        members.emplace_back(std::move(key), std::move(item));
        if (index.empty() && members.size() > 16)
          for (std::size_t i = 0; i < members.size(); ++i) index.emplace(members[i].first, i);
      }
      skip_space();
      if (consume(",")) continue;
      if (consume("}")) return value;
      fail("expected ',' or '}'", pos_);
    }
  }

  std::uint32_t parse_hex4(std::size_t at) const {
    std::uint32_t unit = 0;
    for (std::size_t k = 0; k < 4; ++k) {
      const int digit = at + k < s_.size() ? hex_value(s_[at + k]) : -1;
      if (digit < 0) fail("invalid \\uXXXX escape", at - 2);
      unit = unit * 16 + static_cast<std::uint32_t>(digit);
    }
    return unit;
  }

  std::string parse_string() {
    const std::size_t start = pos_++;  // '"'
    std::string out;
    while (true) {
      if (at_end()) fail("unterminated string", start);
      const char c = s_[pos_];
      if (c == '"') {
        ++pos_;
        return out;
      }
      if (static_cast<unsigned char>(c) < 0x20) fail("invalid control character in string", pos_);
      if (c != '\\') {
        // The text is valid UTF-8 already: copy the run up to the next special byte.
        std::size_t end = pos_ + 1;
        while (end < s_.size() && s_[end] != '"' && s_[end] != '\\' && static_cast<unsigned char>(s_[end]) >= 0x20)
          ++end;
        out.append(s_.data() + pos_, end - pos_);
        pos_ = end;
        continue;
      }
      if (pos_ + 1 >= s_.size()) fail("unterminated string", start);
      const char e = s_[pos_ + 1];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          std::uint32_t cp = parse_hex4(pos_ + 2);
          pos_ += 6;
          // A high surrogate directly followed by an escaped low one is one
          // character, as in Python; anything else leaves it lone (see the top).
          if (cp >= 0xD800 && cp <= 0xDBFF && s_.substr(pos_, 2) == "\\u") {
            const std::uint32_t low = parse_hex4(pos_ + 2);  // Python fails here too if not hex
            if (low >= 0xDC00 && low <= 0xDFFF) {
              cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
              pos_ += 6;
            }
          }
          append_utf8(out, cp);
          continue;
        }
        default: fail("invalid \\escape", pos_);
      }
      pos_ += 2;
    }
  }

  Value parse_number() {
    const std::size_t start = pos_;
    if (s_[pos_] == '-') ++pos_;
    if (at_end() || !is_digit(s_[pos_])) fail("expected a value", start);
    const std::size_t int_start = pos_;
    if (s_[pos_] == '0') {
      ++pos_;  // "01" stops after the 0, and the 1 is then extra data, as in Python
    } else {
      while (pos_ < s_.size() && is_digit(s_[pos_])) ++pos_;
    }
    const std::size_t int_end = pos_;
    bool is_float = false;
    // A fraction needs a digit after the '.', an exponent needs one after [eE][-+]?;
    // otherwise the number ends before them and what is left is an error.
    if (pos_ + 1 < s_.size() && s_[pos_] == '.' && is_digit(s_[pos_ + 1])) {
      is_float = true;
      pos_ += 2;
      while (pos_ < s_.size() && is_digit(s_[pos_])) ++pos_;
    }
    const std::size_t mantissa_end = pos_;
    if (pos_ < s_.size() && (s_[pos_] == 'e' || s_[pos_] == 'E')) {
      std::size_t k = pos_ + 1;
      if (k < s_.size() && (s_[k] == '-' || s_[k] == '+')) ++k;
      if (k < s_.size() && is_digit(s_[k])) {
        while (k < s_.size() && is_digit(s_[k])) ++k;
        is_float = true;
        pos_ = k;
      }
    }
    const std::string_view literal = s_.substr(start, pos_ - start);
    Value value;
    value.text = std::string(literal);
    if (!is_float) {
      // Python's int() refuses longer decimal literals (ValueError) unless told otherwise.
      if (options_.max_integer_digits && int_end - int_start > options_.max_integer_digits)
        fail("integer literal with more than " + std::to_string(options_.max_integer_digits) + " digits", start);
      value.kind = Value::Kind::Int;
      return value;
    }
    value.kind = Value::Kind::Float;
    const auto result = std::from_chars(literal.data(), literal.data() + literal.size(), value.number);
    if (result.ec == std::errc::result_out_of_range) {
      // from_chars is correctly rounded but leaves the value alone when it
      // rounds to 0 or overflows; Python's float() gives +-0.0 and +-inf.
      value.number = overflows(int_start, int_end, mantissa_end) ? std::numeric_limits<double>::infinity() : 0.0;
      if (s_[start] == '-') value.number = -value.number;
    } else if (result.ec != std::errc() || result.ptr != literal.data() + literal.size()) {
      fail("number that cannot be read", start);  // not expected: the grammar was checked above
    }
    return value;
  }

  // For a non-zero literal out of the double range: whether it is too large
  // (rather than too small). With the literal as 0.dddd x 10^p (first digit
  // non-zero), overflow needs p > 308 and underflow p < -322, so p > 0 decides.
  bool overflows(std::size_t int_start, std::size_t int_end, std::size_t mantissa_end) const {
    std::int64_t p = 0;
    std::size_t first = int_start;  // first non-zero digit of the mantissa
    while (first < mantissa_end && (s_[first] == '0' || s_[first] == '.')) ++first;
    if (first < int_end) {
      p = static_cast<std::int64_t>(int_end - first);
    } else if (first < mantissa_end) {
      p = -static_cast<std::int64_t>(first - int_end - 1);  // zeros between the '.' and the first digit
    }
    // The exponent, saturated: |p| above is bounded by the text's length.
    std::int64_t exponent = 0;
    std::size_t k = mantissa_end + 1;
    bool negative = false;
    if (mantissa_end < pos_) {
      if (s_[k] == '-' || s_[k] == '+') negative = s_[k++] == '-';
      constexpr std::int64_t saturated = std::int64_t(1) << 59;  // far beyond any text's length, and 10x fits
      for (; k < pos_ && exponent < saturated; ++k) exponent = exponent * 10 + (s_[k] - '0');
    }
    return p + (negative ? -exponent : exponent) > 0;
  }

  std::string_view s_;
  const Options& options_;
  std::size_t pos_ = 0;
};

}  // namespace detail

// Parses one JSON text like Python's json.loads (see the top of this file);
// throws ParseError.
inline Value parse(std::string_view text, const Options& options = {}) {
  return detail::Parser(text, options).parse();
}

// Whether s is strict UTF-8, the only text Python can encode: false for a
// string holding a lone surrogate from a "\udXXX" escape.
inline bool is_utf8(std::string_view s) { return detail::invalid_utf8_at(s) == std::string_view::npos; }

// Python's repr(float): shortest round-trip digits, scientific below 1e-4 and
// from 1e16 ("1e-05", "1e+16", "1.5e+300", "-0.0", "nan", "inf").
inline std::string float_repr(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  char buffer[64];
  const double magnitude = std::fabs(value);
  const bool scientific = magnitude != 0.0 && (magnitude < 1e-4 || magnitude >= 1e16);
  const auto result = std::to_chars(buffer, buffer + sizeof buffer, value,
                                    scientific ? std::chars_format::scientific : std::chars_format::fixed);
  std::string text(buffer, result.ptr);
  if (!scientific && text.find('.') == std::string::npos) text += ".0";
  return text;
}

// json.dumps(float): float_repr, with NaN, Infinity and -Infinity.
inline std::string dump_float(double value) {
  if (std::isnan(value)) return "NaN";
  if (std::isinf(value)) return value > 0 ? "Infinity" : "-Infinity";
  return float_repr(value);
}

// json.dumps(str) with ensure_ascii=True: ASCII out, everything else as \uXXXX
// (lowercase hex, surrogate pairs above U+FFFF, lone surrogates as themselves).
// Throws std::invalid_argument for bytes that are not (generalized) UTF-8.
inline std::string dump_string(std::string_view s) {
  std::string out = "\"";
  for (std::size_t i = 0; i < s.size();) {
    const std::size_t n = detail::utf8_sequence(s, i, /*allow_surrogates=*/true);
    if (n == 0) throw std::invalid_argument("cannot write a JSON string: byte " + std::to_string(i) + " is not UTF-8");
    const std::uint32_t cp = detail::decode_utf8(s, i, n);
    i += n;
    switch (cp) {
      case '"': out += "\\\""; continue;
      case '\\': out += "\\\\"; continue;
      case '\n': out += "\\n"; continue;
      case '\r': out += "\\r"; continue;
      case '\t': out += "\\t"; continue;
      case '\b': out += "\\b"; continue;
      case '\f': out += "\\f"; continue;
      default: break;
    }
    if (cp >= 0x20 && cp < 0x7F) {
      out += static_cast<char>(cp);
    } else if (cp < 0x10000) {
      detail::append_hex4(out, cp, "\\u");
    } else {
      detail::append_hex4(out, 0xD800 + ((cp - 0x10000) >> 10), "\\u");
      detail::append_hex4(out, 0xDC00 + ((cp - 0x10000) & 0x3FF), "\\u");
    }
  }
  return out + "\"";
}

namespace detail {

// Python's int repr of a JSON integer literal: as written, but "-0" is 0.
inline std::string int_text(const std::string& text) {
  std::size_t digits = !text.empty() && text[0] == '-' ? 1 : 0;
  const bool valid = text.size() > digits && (text[digits] != '0' || text.size() == digits + 1) &&
                     text.find_first_not_of("0123456789", digits) == std::string::npos;
  if (!valid) throw std::invalid_argument("cannot write an Int whose text is not an integer literal: '" + text + "'");
  return text == "-0" ? "0" : text;
}

// Python's repr(str), exact for text up to U+00FF and for lone surrogates;
// other characters that Python's Unicode tables call non-printable (e.g.
// U+2028) are written as UTF-8 where Python would escape them.
inline std::string str_repr(std::string_view s) {
  const bool single = s.find('\'') == std::string_view::npos || s.find('"') != std::string_view::npos;
  const char quote = single ? '\'' : '"';
  std::string out(1, quote);
  for (std::size_t i = 0; i < s.size();) {
    std::size_t n = utf8_sequence(s, i, /*allow_surrogates=*/true);
    if (n == 0) n = 1;  // not reachable for parsed text; show the byte escaped
    const std::uint32_t cp = n == 1 ? static_cast<unsigned char>(s[i]) : decode_utf8(s, i, n);
    if (cp == static_cast<std::uint32_t>(quote) || cp == '\\') {
      out += '\\';
      out += static_cast<char>(cp);
    } else if (cp == '\t') {
      out += "\\t";
    } else if (cp == '\n') {
      out += "\\n";
    } else if (cp == '\r') {
      out += "\\r";
    } else if (cp < 0x20 || (cp >= 0x7F && cp <= 0xA0) || cp == 0xAD) {
      static const char digits[] = "0123456789abcdef";
      out += "\\x";
      out += digits[cp >> 4];
      out += digits[cp & 0xF];
    } else if (cp >= 0xD800 && cp <= 0xDFFF) {
      append_hex4(out, cp, "\\u");
    } else {
      out.append(s.data() + i, n);
    }
    i += n;
  }
  return out + quote;
}

}  // namespace detail

// json.dumps(value): the exact text Python writes for the value json.loads
// gives (", " and ": " separators, ensure_ascii, NaN/Infinity, ints as written).
// Throws std::invalid_argument for what parse() never makes: a string that is
// not (generalized) UTF-8, an Int whose text is not an integer literal.
inline std::string dump(const Value& value) {
  using Kind = Value::Kind;
  switch (value.kind) {
    case Kind::Null: return "null";
    case Kind::Bool: return value.boolean ? "true" : "false";
    case Kind::Int: return detail::int_text(value.text);
    case Kind::Float: return dump_float(value.number);
    case Kind::String: return dump_string(value.text);
    case Kind::Array: {
      std::string out = "[";
      for (std::size_t i = 0; i < value.items.size(); ++i) out += (i ? ", " : "") + dump(value.items[i]);
      return out + "]";
    }
    case Kind::Object: {
      std::string out = "{";
      for (std::size_t i = 0; i < value.members.size(); ++i)
        out += (i ? ", " : "") + dump_string(value.members[i].first) + ": " + dump(value.members[i].second);
      return out + "}";
    }
  }
  return "null";
}

// Python's repr() of what json.loads gives, for error messages ("got [1.0, 'a']"):
// None/True/False, ints as written, float_repr, quoted strings (see
// detail::str_repr for the one inexactness), lists and dicts.
inline std::string repr(const Value& value) {
  using Kind = Value::Kind;
  switch (value.kind) {
    case Kind::Null: return "None";
    case Kind::Bool: return value.boolean ? "True" : "False";
    case Kind::Int: return detail::int_text(value.text);
    case Kind::Float: return float_repr(value.number);
    case Kind::String: return detail::str_repr(value.text);
    case Kind::Array: {
      std::string out = "[";
      for (std::size_t i = 0; i < value.items.size(); ++i) out += (i ? ", " : "") + repr(value.items[i]);
      return out + "]";
    }
    case Kind::Object: {
      std::string out = "{";
      for (std::size_t i = 0; i < value.members.size(); ++i)
        out += (i ? ", " : "") + detail::str_repr(value.members[i].first) + ": " + repr(value.members[i].second);
      return out + "}";
    }
  }
  return "None";
}

}  // namespace dwa::json
