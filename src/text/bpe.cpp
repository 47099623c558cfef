#include "text/bpe.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <mutex>
#include <queue>
#include <shared_mutex>
#include <unordered_map>

#include "core/error.h"
#include "text/unicode.h"

namespace mxlm::text {

namespace {

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};

using Vocab = std::unordered_map<std::string, uint32_t, StringHash, std::equal_to<>>;

struct Merge {
  uint32_t rank;
  uint32_t new_id;
};

uint64_t pair_key(uint32_t a, uint32_t b) { return (static_cast<uint64_t>(a) << 32) | b; }

struct Symbol {
  uint32_t id;
  int prev;
  int next;
  bool removed;
};

struct Candidate {
  uint32_t rank;
  int pos;
  uint32_t new_id;
  // std::priority_queue pops the largest: invert so the lowest rank, then leftmost, comes first.
  bool operator<(const Candidate& other) const { return rank != other.rank ? rank > other.rank : pos > other.pos; }
};

// HF caches words shorter than this many bytes.
constexpr size_t kMaxCachedWord = 256;
constexpr size_t kCacheCapacity = 200000;

}  // namespace

struct BpeModel::Impl {
  Vocab vocab;
  std::vector<std::string> vocab_r;
  std::unordered_map<uint64_t, Merge> merges;
  std::optional<std::string> unk_token;
  std::optional<std::string> continuing_subword_prefix;
  std::optional<std::string> end_of_word_suffix;
  bool byte_fallback = false;
  bool fuse_unk = false;
  bool ignore_merges = false;
  // Ids of single code points below 0x10000 (most words are built from these), -1 when absent.
  std::vector<int32_t> char_ids;

  mutable std::shared_mutex cache_mutex;
  mutable std::unordered_map<std::string, std::vector<uint32_t>, StringHash, std::equal_to<>> cache;

  std::optional<uint32_t> lookup(std::string_view token) const {
    const auto it = vocab.find(token);
    if (it == vocab.end()) return std::nullopt;
    return it->second;
  }

  void merge_word(std::string_view word, std::vector<uint32_t>& out) const;
};

BpeModel::BpeModel(const nlohmann::json& model) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  if (!model.is_object()) fail("tokenizer.json: \"model\" must be an object");
  const std::string type = model.value("type", "BPE");
  if (type != "BPE") fail("tokenizer.json: unsupported model type {:?} (only BPE is implemented)", type);
  const auto vocab = model.find("vocab");
  if (vocab == model.end() || !vocab->is_object()) fail("tokenizer.json: BPE model needs a \"vocab\" object");
  m.vocab.reserve(vocab->size());
  uint32_t end = 0;
  for (const auto& [token, id] : vocab->items()) {
    if (!id.is_number_unsigned() || id.get<uint64_t>() > 0x7FFFFFFF)
      fail("tokenizer.json: bad id for token {:?}", token);
    const auto value = id.get<uint32_t>();
    m.vocab.emplace(token, value);
    end = std::max(end, value + 1);
  }
  m.vocab_r.resize(end);
  for (const auto& [token, id] : m.vocab) m.vocab_r[id] = token;

  const auto optional_string = [&](const char* key) -> std::optional<std::string> {
    const auto it = model.find(key);
    if (it == model.end() || it->is_null()) return std::nullopt;
    if (!it->is_string()) fail("tokenizer.json: BPE {:?} must be a string or null", key);
    return it->get<std::string>();
  };
  m.unk_token = optional_string("unk_token");
  m.continuing_subword_prefix = optional_string("continuing_subword_prefix");
  m.end_of_word_suffix = optional_string("end_of_word_suffix");
  const auto flag = [&](const char* key) {
    const auto it = model.find(key);
    return it != model.end() && it->is_boolean() && it->get<bool>();
  };
  m.byte_fallback = flag("byte_fallback");
  m.fuse_unk = flag("fuse_unk");
  m.ignore_merges = flag("ignore_merges");
  if (m.unk_token && !m.lookup(*m.unk_token))
    fail("tokenizer.json: BPE unk_token {:?} is not in the vocab", *m.unk_token);
  if (model.contains("dropout") && !model["dropout"].is_null() && model["dropout"].get<double>() > 0.0) {
    fail("tokenizer.json: BPE dropout is not supported (it makes encoding random)");
  }

  const size_t prefix_len = m.continuing_subword_prefix ? m.continuing_subword_prefix->size() : 0;
  const auto merges = model.find("merges");
  if (merges != model.end() && !merges->is_array()) fail("tokenizer.json: BPE \"merges\" must be an array");
  if (merges != model.end()) {
    m.merges.reserve(merges->size() * 2);
    uint32_t rank = 0;
    for (const auto& entry : *merges) {
      std::string a, b;
      if (entry.is_string()) {
        const std::string& line = entry.get_ref<const std::string&>();
        const size_t space = line.find(' ');
        if (space == std::string::npos || line.find(' ', space + 1) != std::string::npos) {
          fail("tokenizer.json: merge {:?} is not two tokens separated by one space", line);
        }
        a = line.substr(0, space);
        b = line.substr(space + 1);
      } else if (entry.is_array() && entry.size() == 2 && entry[0].is_string() && entry[1].is_string()) {
        a = entry[0].get<std::string>();
        b = entry[1].get<std::string>();
      } else {
        fail("tokenizer.json: merge #{} must be \"a b\" or [\"a\", \"b\"]", rank);
      }
      const auto a_id = m.lookup(a);
      const auto b_id = m.lookup(b);
      if (!a_id || !b_id)
        fail("tokenizer.json: merge #{} ({:?}, {:?}) uses a token missing from the vocab", rank, a, b);
      if (b.size() < prefix_len)
        fail("tokenizer.json: merge #{} token {:?} is shorter than the subword prefix", rank, b);
      const std::string merged = a + b.substr(prefix_len);
      const auto new_id = m.lookup(merged);
      if (!new_id) fail("tokenizer.json: merge #{} makes {:?}, which is not in the vocab", rank, merged);
      m.merges[pair_key(*a_id, *b_id)] = {rank, *new_id};
      ++rank;
    }
  }

  m.char_ids.assign(0x10000, -1);
  for (const auto& [token, id] : m.vocab) {
    size_t i = 0;
    const char32_t cp = next_code_point(token, i);
    if (i == token.size() && cp < 0x10000 && token != "\xEF\xBF\xBD") m.char_ids[cp] = static_cast<int32_t>(id);
  }
  m.cache.reserve(4096);
}

BpeModel::~BpeModel() = default;

std::optional<uint32_t> BpeModel::token_to_id(std::string_view token) const { return impl_->lookup(token); }

const std::string* BpeModel::id_to_token(uint32_t id) const {
  if (id >= impl_->vocab_r.size()) return nullptr;
  const std::string& token = impl_->vocab_r[id];
  // Holes in the id space are empty strings; a real token is never empty.
  return token.empty() ? nullptr : &token;
}

uint32_t BpeModel::vocab_end() const { return static_cast<uint32_t>(impl_->vocab_r.size()); }

void BpeModel::Impl::merge_word(std::string_view word, std::vector<uint32_t>& out) const {
  std::vector<Symbol> symbols;
  symbols.reserve(word.size());
  const auto add = [&](uint32_t id) {
    const int index = static_cast<int>(symbols.size());
    symbols.push_back({id, index - 1, index + 1, false});
  };
  int64_t unk_pending = -1;  // an unknown-token run not yet added
  const bool plain = !continuing_subword_prefix && !end_of_word_suffix;
  std::string piece;
  size_t i = 0;
  while (i < word.size()) {
    const size_t start = i;
    const char32_t cp = next_code_point(word, i);
    const bool is_first = start == 0;
    const bool is_last = i == word.size();
    std::optional<uint32_t> id;
    std::string_view text = word.substr(start, i - start);
    if (plain) {
      if (cp < 0x10000 && char_ids[cp] >= 0 && cp != 0xFFFD) {
        id = static_cast<uint32_t>(char_ids[cp]);
      } else {
        id = lookup(text);
      }
    } else {
      piece.clear();
      if (!is_first && continuing_subword_prefix) piece += *continuing_subword_prefix;
      piece += text;
      if (is_last && end_of_word_suffix) piece += *end_of_word_suffix;
      text = piece;
      id = lookup(text);
    }
    if (id) {
      if (unk_pending >= 0) {
        add(static_cast<uint32_t>(unk_pending));
        unk_pending = -1;
      }
      add(*id);
      continue;
    }
    if (byte_fallback) {
      std::vector<uint32_t> bytes;
      for (unsigned char b : text) {
        const auto byte_id = lookup(fmt::format("<0x{:02X}>", b));
        if (!byte_id) break;
        bytes.push_back(*byte_id);
      }
      if (bytes.size() == text.size()) {
        for (uint32_t b : bytes) add(b);
        continue;
      }
    }
    if (unk_token) {
      const uint32_t unk_id = *lookup(*unk_token);
      if (unk_pending >= 0 && fuse_unk) continue;  // fused into the pending unknown
      if (unk_pending >= 0) add(static_cast<uint32_t>(unk_pending));
      unk_pending = unk_id;
    }
    // Without an unk token HF silently drops characters it cannot represent.
  }
  if (unk_pending >= 0) add(static_cast<uint32_t>(unk_pending));
  if (symbols.empty()) return;
  symbols.back().next = -1;

  std::priority_queue<Candidate> queue;
  for (size_t k = 0; k + 1 < symbols.size(); ++k) {
    const auto it = merges.find(pair_key(symbols[k].id, symbols[k + 1].id));
    if (it != merges.end()) queue.push({it->second.rank, static_cast<int>(k), it->second.new_id});
  }
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& left = symbols[top.pos];
    if (left.removed || left.next < 0) continue;
    const int right_pos = left.next;
    Symbol& right = symbols[right_pos];
    // Skip entries made stale by an earlier merge of either symbol.
    const auto it = merges.find(pair_key(left.id, right.id));
    if (it == merges.end() || it->second.new_id != top.new_id) continue;
    left.id = top.new_id;
    right.removed = true;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = top.pos;
    if (left.prev >= 0) {
      const auto p = merges.find(pair_key(symbols[left.prev].id, left.id));
      if (p != merges.end()) queue.push({p->second.rank, left.prev, p->second.new_id});
    }
    if (left.next >= 0) {
      const auto n = merges.find(pair_key(left.id, symbols[left.next].id));
      if (n != merges.end()) queue.push({n->second.rank, top.pos, n->second.new_id});
    }
  }
  for (const auto& s : symbols) {
    if (!s.removed) out.push_back(s.id);
  }
}

void BpeModel::encode_word(std::string_view word, std::vector<uint32_t>& ids) const {
  if (word.empty()) return;
  if (impl_->ignore_merges) {
    if (const auto id = impl_->lookup(word)) {
      ids.push_back(*id);
      return;
    }
  }
  const bool cacheable = word.size() < kMaxCachedWord;
  if (cacheable) {
    std::shared_lock lock(impl_->cache_mutex);
    const auto it = impl_->cache.find(word);
    if (it != impl_->cache.end()) {
      ids.insert(ids.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t first = ids.size();
  impl_->merge_word(word, ids);
  if (cacheable) {
    std::unique_lock lock(impl_->cache_mutex);
    if (impl_->cache.size() < kCacheCapacity) {
      impl_->cache.emplace(std::string(word),
                           std::vector<uint32_t>(ids.begin() + static_cast<ptrdiff_t>(first), ids.end()));
    }
  }
}

}  // namespace mxlm::text
