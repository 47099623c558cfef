#include "text/tokenizer_post_processor.h"

#include <nlohmann/json.hpp>

#include <string>

#include "core/error.h"
#include "text/tokenizer_json.h"

namespace mxlm::text {

namespace {

class NoOp final : public PostProcessor {
 public:
  void add_special_tokens(std::vector<uint32_t>&) const override {}
};

// The single-sequence template: a list of special-token id runs and the sequence itself.
class Template final : public PostProcessor {
 public:
  struct Item {
    bool is_sequence = false;
    std::vector<uint32_t> ids;
  };
  explicit Template(std::vector<Item> items) : items_(std::move(items)) {}
  void add_special_tokens(std::vector<uint32_t>& ids) const override {
    std::vector<uint32_t> out;
    out.reserve(ids.size() + 4);
    for (const auto& item : items_) {
      if (item.is_sequence) {
        out.insert(out.end(), ids.begin(), ids.end());
      } else {
        out.insert(out.end(), item.ids.begin(), item.ids.end());
      }
    }
    ids = std::move(out);
  }

 private:
  std::vector<Item> items_;
};

class Sequence final : public PostProcessor {
 public:
  explicit Sequence(std::vector<std::unique_ptr<PostProcessor>> steps) : steps_(std::move(steps)) {}
  void add_special_tokens(std::vector<uint32_t>& ids) const override {
    for (const auto& step : steps_) step->add_special_tokens(ids);
  }

 private:
  std::vector<std::unique_ptr<PostProcessor>> steps_;
};

uint32_t special_id(const nlohmann::json& pair, const char* owner) {
  // ["<s>", 1]
  if (!pair.is_array() || pair.size() != 2 || !pair[1].is_number_unsigned()) {
    fail("tokenizer.json: post_processor {} needs [token, id]", owner);
  }
  return pair[1].get<uint32_t>();
}

std::unique_ptr<PostProcessor> make_template(const nlohmann::json& config) {
  const auto& single = json_array(config, "single", "post_processor TemplateProcessing");
  const auto specials = config.find("special_tokens");
  std::vector<Template::Item> items;
  for (const auto& piece : single) {
    Template::Item item;
    if (piece.contains("Sequence")) {
      item.is_sequence = true;
    } else if (piece.contains("SpecialToken")) {
      const std::string name = json_string(piece["SpecialToken"], "id", "post_processor SpecialToken");
      if (specials == config.end() || !specials->is_object() || !specials->contains(name)) {
        fail("tokenizer.json: TemplateProcessing uses special token {:?} missing from \"special_tokens\"", name);
      }
      const auto& entry = (*specials)[name];
      for (const auto& id : json_array(entry, "ids", "post_processor special token")) {
        if (!id.is_number_unsigned()) fail("tokenizer.json: special token {:?} has a bad id", name);
        item.ids.push_back(id.get<uint32_t>());
      }
    } else {
      fail("tokenizer.json: TemplateProcessing item must be Sequence or SpecialToken");
    }
    items.push_back(std::move(item));
  }
  return std::make_unique<Template>(std::move(items));
}

}  // namespace

std::unique_ptr<PostProcessor> make_post_processor(const nlohmann::json& config) {
  if (config.is_null()) return std::make_unique<NoOp>();
  const std::string type = json_string(config, "type", "post_processor");
  if (type == "ByteLevel") return std::make_unique<NoOp>();
  if (type == "TemplateProcessing") return make_template(config);
  if (type == "BertProcessing" || type == "RobertaProcessing") {
    std::vector<Template::Item> items(3);
    items[0].ids = {special_id(config.value("cls", nlohmann::json()), "cls")};
    items[1].is_sequence = true;
    items[2].ids = {special_id(config.value("sep", nlohmann::json()), "sep")};
    return std::make_unique<Template>(std::move(items));
  }
  if (type == "Sequence") {
    std::vector<std::unique_ptr<PostProcessor>> steps;
    for (const auto& step : json_array(config, "processors", "post_processor Sequence")) {
      steps.push_back(make_post_processor(step));
    }
    return std::make_unique<Sequence>(std::move(steps));
  }
  fail("tokenizer.json: unsupported post_processor type {:?}", type);
}

}  // namespace mxlm::text
