"""Hand-written sample records in each task's Hugging Face schema; writes sample_data/.

Run ``python jpeft/assets/sample_records.py`` to regenerate the bundled JSONL files.
"""

import json
import pathlib

BOOLQ = [
    ("is water wet", "Water is a liquid that makes things wet when it touches them.", True),
    ("is the sun a planet", "The Sun is the star at the center of the Solar System.", False),
    ("can penguins fly", "Penguins are flightless birds that live mostly in the Southern Hemisphere.", False),
    ("is ice colder than steam", "Ice is frozen water, while steam is water heated past its boiling point.", True),
    ("do cats have whiskers", "Cats have long whiskers on their faces that help them sense the space around them.", True),
    ("is paris the capital of italy", "Paris is the capital and largest city of France.", False),
    ("is a tomato a fruit", "Botanically, a tomato is the fruit of the tomato plant because it holds seeds.", True),
    ("does the moon make its own light", "The Moon shines because it reflects light from the Sun.", False),
    ("are whales mammals", "Whales breathe air, are warm-blooded and feed their young with milk, like all mammals.", True),
    ("is glass made from sand", "Most glass is made by melting sand together with soda and lime.", True),
    ("is a spider an insect", "Spiders are arachnids; they have eight legs, while insects have six.", False),
    ("does sound travel in space", "Sound needs a medium such as air to travel, and space is almost empty.", False),
    ("is the pacific the largest ocean", "The Pacific Ocean is the largest and deepest of Earth's oceans.", True),
    ("can humans breathe underwater", "Humans need air to breathe and cannot take oxygen from water.", False),
    ("is gold a metal", "Gold is a soft, yellow metal used in jewelry and electronics.", True),
    ("do plants need sunlight", "Plants use sunlight to make food through photosynthesis.", True),
    ("is mount everest in africa", "Mount Everest lies in the Himalayas, on the border of Nepal and China.", False),
    ("is a bat a bird", "Bats are flying mammals; they have fur and feed their young with milk.", False),
]
PIQA = [
    ("To keep bread fresh longer,", "store it in a sealed bag.", "leave it open on the counter.", 0),
    ("To cool down a hot drink,", "put it in the oven.", "add an ice cube.", 1),
    ("To open a jar with a tight lid,", "run the lid under hot water.", "put the jar in the freezer.", 0),
    ("To dry wet shoes,", "stuff them with newspaper.", "fill them with water.", 0),
    ("To light a dark room,", "close the curtains.", "turn on a lamp.", 1),
    ("To remove a splinter,", "use clean tweezers.", "hit it with a hammer.", 0),
    ("To keep a cut flower alive,", "put its stem in water.", "keep it in a dry drawer.", 0),
    ("To stop a squeaky door,", "oil the hinges.", "paint the handle.", 0),
    ("To make tea,", "pour cold water on a stone.", "steep a tea bag in hot water.", 1),
    ("To clean a dirty window,", "wipe it with soapy water.", "cover it with mud.", 0),
    ("To carry soup to work,", "use a sealed thermos.", "use a paper bag.", 0),
    ("To find a book in a library,", "search the catalog.", "read every book.", 0),
    ("To warm cold hands,", "rub them together.", "hold a snowball.", 0),
    ("To water a garden,", "use a hose.", "use a hair dryer.", 0),
    ("To sharpen a pencil,", "use a sharpener.", "dip it in glue.", 0),
    ("To keep milk from spoiling,", "leave it in the sun.", "keep it in the fridge.", 1),
    ("To tie a shoe,", "loop the laces into a bow.", "cut the laces off.", 0),
    ("To boil an egg,", "put it in boiling water.", "put it in a glass of milk.", 0),
]
SIQA = [
    ("Alex forgot his lunch at home.", "How would Alex feel?", "hungry", "sleepy", "proud", "1"),
    ("Sam helped her neighbor carry heavy boxes.", "How would the neighbor feel?", "angry", "grateful", "bored", "2"),
    ("Jordan studied every night for the exam.", "Why did Jordan do this?", "to fail", "to sleep", "to pass the exam", "3"),
    ("Riley gave a gift to her friend.", "What will the friend want to do next?", "say thank you", "throw it away", "run away", "1"),
    ("Casey broke a glass at the party.", "What will Casey want to do next?", "break more glasses", "clean up the pieces", "leave the city", "2"),
    ("Taylor won the race.", "How would Taylor feel?", "sad", "happy", "scared", "2"),
    ("Morgan was late for work again.", "What will the boss want to do?", "talk to Morgan", "give Morgan a prize", "sing a song", "1"),
    ("Jamie cooked dinner for the family.", "What will the family want to do next?", "eat the dinner", "go to school", "wash the car", "1"),
    ("Quinn lost her keys.", "What does Quinn need to do?", "buy a boat", "look for the keys", "paint the door", "2"),
    ("Lee told a funny joke.", "How would others feel?", "amused", "tired", "hungry", "1"),
    ("Pat watered the plants every day.", "Why did Pat do this?", "to kill them", "to keep them alive", "to sell water", "2"),
    ("Drew saved money for months.", "Why did Drew do this?", "to buy a bike", "to lose it", "to forget it", "1"),
    ("Kim apologized to her brother.", "How would her brother feel?", "insulted", "forgiving", "lost", "2"),
    ("Max fell and scraped his knee.", "What will Max want to do next?", "clean the wound", "run a marathon", "eat sand", "1"),
    ("Ava painted a picture for her mom.", "How would her mom feel?", "touched", "annoyed", "afraid", "1"),
    ("Noah missed the bus.", "What will Noah need to do?", "walk or take a taxi", "fly a plane", "go to bed", "1"),
    ("Mia shared her umbrella in the rain.", "How would Mia be seen?", "as selfish", "as kind", "as lazy", "2"),
    ("Eli practiced the piano for hours.", "Why did Eli do this?", "to get better", "to break it", "to sleep", "1"),
]
WINOGRANDE = [
    ("The trophy did not fit in the suitcase because the _ was too big.", "trophy", "suitcase", "1"),
    ("The trophy did not fit in the suitcase because the _ was too small.", "trophy", "suitcase", "2"),
    ("Maria lent her book to Anna because _ had finished reading it.", "Maria", "Anna", "1"),
    ("The cup fell off the table because the _ was tilted.", "cup", "table", "2"),
    ("John could not lift the box because the _ was too heavy.", "John", "box", "2"),
    ("The ice melted faster than the rock because the _ was soft.", "ice", "rock", "1"),
    ("Sarah called Beth to thank her because _ had helped her move.", "Sarah", "Beth", "2"),
    ("The dog chased the cat until the _ climbed a tree.", "dog", "cat", "2"),
    ("The car passed the bike because the _ was faster.", "car", "bike", "1"),
    ("The soup was colder than the tea because the _ had been left out.", "soup", "tea", "1"),
    ("Tom gave Jim his coat because _ was cold.", "Tom", "Jim", "2"),
    ("The pen ran out of ink before the pencil because the _ was used more.", "pen", "pencil", "1"),
    ("The plant grew taller than the weed because the _ got more water.", "plant", "weed", "1"),
    ("Kate beat Lily at chess because _ had practiced more.", "Kate", "Lily", "1"),
    ("The window broke but the wall did not because the _ was fragile.", "window", "wall", "1"),
    ("Ben asked Carl for directions because _ knew the city.", "Ben", "Carl", "2"),
    ("The boat sank but the raft floated because the _ had a hole.", "boat", "raft", "1"),
    ("The shirt dried before the towel because the _ was thin.", "shirt", "towel", "1"),
]
ARC = [
    ("Which of these is a source of light?", ["a rock", "the Sun", "a shadow", "a mirror"], "B"),
    ("What do plants need to make food?", ["sunlight", "darkness", "sand", "plastic"], "A"),
    ("Which state of matter has a fixed shape?", ["gas", "liquid", "solid", "steam"], "C"),
    ("What force pulls objects toward Earth?", ["magnetism", "friction", "gravity", "wind"], "C"),
    ("Which animal is a mammal?", ["shark", "frog", "eagle", "dolphin"], "D"),
    ("What happens to water when it freezes?", ["it becomes ice", "it becomes gas", "it disappears", "it becomes salt"], "A"),
    ("Which organ pumps blood through the body?", ["lungs", "heart", "stomach", "brain"], "B"),
    ("What is the main gas in the air we breathe?", ["oxygen", "nitrogen", "helium", "carbon dioxide"], "B"),
    ("Which tool measures temperature?", ["ruler", "scale", "thermometer", "clock"], "C"),
    ("What causes day and night on Earth?", ["Earth's rotation", "the Moon's phases", "clouds", "ocean tides"], "A"),
    ("Which material conducts electricity best?", ["wood", "rubber", "copper", "glass"], "C"),
    ("Where does most of Earth's energy come from?", ["the Moon", "the Sun", "volcanoes", "wind"], "B"),
    ("Which of these is a renewable resource?", ["coal", "oil", "solar energy", "natural gas"], "C"),
    ("What do bees collect from flowers?", ["nectar", "rocks", "water", "leaves"], "A"),
    ("Which planet is closest to the Sun?", ["Earth", "Mars", "Mercury", "Venus"], "C"),
    ("What part of a plant takes in water from the soil?", ["flower", "roots", "leaves", "fruit"], "B"),
    ("Which is a producer in a food chain?", ["grass", "rabbit", "fox", "hawk"], "A"),
    ("What is formed when water vapor cools in the sky?", ["clouds", "rocks", "soil", "sand"], "A"),
]
OBQA = [
    ("A magnet will stick to", ["a wooden spoon", "an iron nail", "a glass cup", "a paper towel"], "B"),
    ("Plants take in carbon dioxide through their", ["roots", "leaves", "flowers", "seeds"], "B"),
    ("When the weather is very cold, a pond may", ["boil", "freeze", "glow", "melt"], "B"),
    ("An example of a renewable resource is", ["wind", "coal", "oil", "gasoline"], "A"),
    ("Sound travels fastest through", ["a vacuum", "air", "steel", "smoke"], "C"),
    ("A caterpillar will eventually become a", ["frog", "butterfly", "bird", "fish"], "B"),
    ("To see a distant planet, one would use a", ["microscope", "telescope", "magnifier", "stethoscope"], "B"),
    ("Evaporation turns liquid water into", ["ice", "vapor", "salt", "sand"], "B"),
    ("An animal that eats only plants is a", ["carnivore", "herbivore", "predator", "decomposer"], "B"),
    ("The moon is visible at night because it", ["makes light", "reflects sunlight", "is on fire", "is a star"], "B"),
    ("A seed needs water and warmth to", ["melt", "germinate", "freeze", "rust"], "B"),
    ("Friction between two hands produces", ["cold", "heat", "light", "sound only"], "B"),
    ("Metals are good at conducting", ["electricity", "silence", "darkness", "cold only"], "A"),
    ("Fossils are most often found in", ["sedimentary rock", "clouds", "lava", "ice cream"], "A"),
    ("A compass needle points toward", ["the Sun", "magnetic north", "the Moon", "the ground"], "B"),
    ("Rain falls from clouds because of", ["gravity", "magnetism", "sunlight", "wind alone"], "A"),
    ("The heart of an animal pumps", ["air", "blood", "food", "water only"], "B"),
    ("A shadow forms when an object blocks", ["sound", "light", "heat", "air"], "B"),
]


def rows(task):
    if task == "boolq":
        return [{"question": q, "passage": p, "answer": a} for q, p, a in BOOLQ]
    if task == "piqa":
        return [{"goal": g, "sol1": s1, "sol2": s2, "label": l} for g, s1, s2, l in PIQA]
    if task == "siqa":
        return [{"context": c, "question": q, "answerA": a, "answerB": b, "answerC": cc, "label": l} for c, q, a, b, cc, l in SIQA]
    if task == "winogrande":
        return [{"sentence": s, "option1": o1, "option2": o2, "answer": a} for s, o1, o2, a in WINOGRANDE]
    if task in ("arc_easy", "arc_challenge"):
        prefix = "Mercury_SC_" if task == "arc_easy" else "MCAS_"
        return [{"id": f"{prefix}{i:04d}", "question": q, "choices": {"text": t, "label": list("ABCD")}, "answerKey": k}
                for i, (q, t, k) in enumerate(ARC)]
    return [{"id": f"{i}-{i * 7 % 100}", "question_stem": q, "choices": {"text": t, "label": list("ABCD")}, "answerKey": k}
            for i, (q, t, k) in enumerate(OBQA)]


def instructions():
    out = []
    for q, p, a in BOOLQ:
        out.append({"instruction": f"Please answer the following question with true or false, question: {q}?\n\n"
                    "Answer format: true/false", "input": "", "output": f"the correct answer is {str(a).lower()}",
                    "answer": str(a).lower()})
    for g, s1, s2, l in PIQA:
        out.append({"instruction": f"Please choose the correct solution to the question: {g}\n\nSolution1: {s1}\n\n"
                    f"Solution2: {s2}\n\nAnswer format: solution1/solution2", "input": "",
                    "output": f"the correct answer is solution{l + 1}", "answer": f"solution{l + 1}"})
    return out


if __name__ == "__main__":
    root = pathlib.Path(__file__).parent / "sample_data"
    for task in ("boolq", "piqa", "siqa", "winogrande", "arc_easy", "arc_challenge", "obqa"):
        records = rows(task)
        (root / task).mkdir(parents=True, exist_ok=True)
        for split, part in (("train", records[:12]), ("validation", records[12:])):
            with open(root / task / f"{split}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in part)
    with open(root / "commonsense_mini.json", "w") as f:
        json.dump(instructions(), f, indent=1)
