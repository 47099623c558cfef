// CPython's random.Random against values printed by CPython 3.11 (the Python tests check all 1319 draws).
#include <gtest/gtest.h>

#include "core/error.h"
#include "eval/python_random.h"

namespace mxlm::eval {
namespace {

TEST(PythonRandom, GetrandbitsMatchesCPython) {
  // python3 -c "import random; r=random.Random(1234); print([r.getrandbits(32) for _ in range(3)])"
  PythonRandom r(1234);
  EXPECT_EQ(r.getrandbits(32), 4150886329u);
  EXPECT_EQ(r.getrandbits(32), 3342196574u);
  EXPECT_EQ(r.getrandbits(32), 1892932127u);
}

TEST(PythonRandom, SampleMatchesSpecRows) {
  // spec/gsm8k_eval.md §3, test documents 0..5.
  PythonRandom r(1234);
  const std::vector<std::vector<size_t>> expected = {{6374, 3610, 957, 61, 742},    {7462, 6610, 4769, 286, 5501},
                                                     {5677, 687, 806, 6279, 2905},  {1939, 142, 252, 6461, 129},
                                                     {2835, 5311, 5105, 3966, 5044}, {3797, 1216, 747, 1499, 5844}};
  for (const auto& row : expected) EXPECT_EQ(r.sample(7473, 5), row);
}

TEST(PythonRandom, SmallPopulationUsesPoolBranch) {
  // python3 -c "import random; r=random.Random(7); print(r.sample(range(10),4), r.sample(range(30),8))"
  PythonRandom r(7);
  EXPECT_EQ(r.sample(10, 4), (std::vector<size_t>{5, 2, 6, 9}));
  EXPECT_EQ(r.sample(30, 8), (std::vector<size_t>{1, 2, 26, 17, 3, 11, 18, 29}));
}

TEST(PythonRandom, WideSeedsAndBits) {
  // python3 -c "import random; r=random.Random(2**40+5); print(r.getrandbits(64), r.getrandbits(40), r._randbelow(1))"
  PythonRandom r((uint64_t{1} << 40) + 5);
  EXPECT_EQ(r.getrandbits(64), 9535518150286577956ull);
  EXPECT_EQ(r.getrandbits(40), 727003120297ull);
  EXPECT_EQ(r.randbelow(1), 0u);
}

TEST(PythonRandom, RejectsBadArguments) {
  PythonRandom r(0);
  EXPECT_THROW(r.sample(3, 4), Error);
  EXPECT_THROW(r.randbelow(0), Error);
  EXPECT_THROW(r.getrandbits(65), Error);
}

}  // namespace
}  // namespace mxlm::eval
