// A checkpoint directory as Hugging Face lays it out: one model.safetensors, or shards described by
// model.safetensors.index.json, or (no index) whatever *.safetensors files are there.
#include <algorithm>
#include <fstream>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/log.h"
#include "io/safetensors.h"

namespace mxlm::io {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr const char* kIndexName = "model.safetensors.index.json";

json read_json_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("{}: cannot open", path.string());
  std::stringstream buffer;
  buffer << in.rdbuf();
  try {
    return json::parse(buffer.str());
  } catch (const json::exception& e) {
    fail("{}: not valid JSON ({})", path.string(), e.what());
  }
}

// A shard name from the index must stay inside the checkpoint directory.
void check_shard_name(const std::string& file, const fs::path& index_path) {
  const fs::path p(file);
  if (file.empty() || p.is_absolute() || p.has_parent_path() || file == "." || file == "..")
    fail("{}: shard name '{}' is not a plain file name", index_path.string(), file);
}

}  // namespace

Checkpoint::Checkpoint(const fs::path& dir) : dir_(dir) {
  if (!fs::is_directory(dir)) fail("{}: not a directory", dir.string());
  const fs::path index_path = dir / kIndexName;

  std::map<std::string, std::string> weight_map;  // tensor -> shard file, when there is an index
  std::vector<std::string> file_names;
  if (fs::exists(index_path)) {
    const json index = read_json_file(index_path);
    if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object())
      fail("{}: no \"weight_map\" object", index_path.string());
    if (index["weight_map"].empty()) fail("{}: \"weight_map\" is empty", index_path.string());
    std::set<std::string> shards;
    for (const auto& [tensor, file] : index["weight_map"].items()) {
      if (!file.is_string()) fail("{}: weight_map entry '{}' is not a file name", index_path.string(), tensor);
      const auto& name = file.get_ref<const std::string&>();
      check_shard_name(name, index_path);
      weight_map[tensor] = name;
      shards.insert(name);
    }
    for (const auto& shard : shards) {
      if (!fs::exists(dir / shard)) fail("{}: shard '{}' listed in {} does not exist", dir.string(), shard, kIndexName);
      file_names.push_back(shard);
    }
  } else if (fs::exists(dir / "model.safetensors")) {
    file_names.push_back("model.safetensors");
  } else {
    for (const auto& entry : fs::directory_iterator(dir))
      if (entry.is_regular_file() && entry.path().extension() == ".safetensors")
        file_names.push_back(entry.path().filename().string());
    std::sort(file_names.begin(), file_names.end());
  }
  if (file_names.empty()) fail("{}: no model.safetensors, {} or *.safetensors files", dir.string(), kIndexName);

  for (const auto& name : file_names) files_.push_back(std::make_unique<SafetensorsFile>(dir / name));

  size_t unlisted = 0;
  for (const auto& file : files_) {
    const std::string file_name = file->path().filename().string();
    for (const auto& tensor : file->tensors()) {
      if (!weight_map.empty()) {
        auto listed = weight_map.find(tensor.name);
        if (listed == weight_map.end()) {
          ++unlisted;  // transformers ignores tensors the index does not list; so do we
          continue;
        }
      }
      auto [it, inserted] = index_.try_emplace(tensor.name, file.get(), &tensor);
      if (!inserted)
        fail("{}: tensor '{}' is stored twice, in {} and in {}", dir.string(), tensor.name,
             it->second.first->path().filename().string(), file_name);
    }
  }
  for (const auto& [tensor, shard] : weight_map) {
    auto it = index_.find(tensor);
    if (it == index_.end())
      fail("{}: tensor '{}' is listed in {} under '{}' but that shard does not contain it", dir.string(), tensor,
           kIndexName, shard);
    const std::string actual = it->second.first->path().filename().string();
    if (actual != shard)
      fail("{}: tensor '{}' is listed in {} under '{}' but stored in '{}'", dir.string(), tensor, kIndexName, shard,
           actual);
  }
  if (unlisted)
    spdlog::warn("{}: {} tensors in the shards are not listed in {}; ignored", dir.string(), unlisted, kIndexName);
}

std::vector<std::string> Checkpoint::tensor_names() const {
  std::vector<std::string> names;
  names.reserve(index_.size());
  for (const auto& [name, location] : index_) names.push_back(name);
  return names;
}

bool Checkpoint::contains(std::string_view name) const { return index_.find(name) != index_.end(); }

const TensorInfo& Checkpoint::info(std::string_view name) const {
  auto it = index_.find(name);
  if (it == index_.end()) fail("{}: no tensor named '{}'", dir_.string(), name);
  return *it->second.second;
}

std::span<const uint8_t> Checkpoint::data(std::string_view name) const {
  auto it = index_.find(name);
  if (it == index_.end()) fail("{}: no tensor named '{}'", dir_.string(), name);
  return it->second.first->data(*it->second.second);
}

const SafetensorsFile& Checkpoint::file_of(std::string_view name) const {
  auto it = index_.find(name);
  if (it == index_.end()) fail("{}: no tensor named '{}'", dir_.string(), name);
  return *it->second.first;
}

uint64_t Checkpoint::total_bytes() const {
  uint64_t total = 0;
  for (const auto& [name, location] : index_) total += location.second->nbytes();
  return total;
}

}  // namespace mxlm::io
