"""Hand-written sample records in each task's Hugging Face schema; writes ``sample_data/``.

Run ``python jpeft/assets/sample_records.py`` to regenerate the bundled files: per task the
first 24 records are ``train.jsonl`` and the other 12 ``validation.jsonl``, plus
``commonsense_mini.json`` (the same questions in the LLM-Adapters ``commonsense_170k.json``
format). Multiple-choice rows are written as (question, correct, wrong options); the correct
option is placed at index ``(7 * i + 1) % n`` so the labels are spread over all positions.
"""

import json
import pathlib

# (question, passage, answer)
BOOLQ = [
    ("is the sun a star", "The Sun is the star at the center of the Solar System. It is a nearly perfect ball of hot plasma.", True),
    ("can penguins fly", "Penguins are a group of aquatic flightless birds living almost exclusively in the Southern Hemisphere.", False),
    ("is a tomato a fruit", "Botanically, a tomato is a fruit, because it develops from the ovary of a flower and contains seeds.", True),
    ("does the moon produce its own light", "The Moon does not make its own light; it shines because its surface reflects sunlight.", False),
    ("are whales mammals", "Whales are warm-blooded marine mammals that breathe air and feed their young with milk.", True),
    ("is glass made from sand", "Most glass is made by melting silica sand together with soda ash and limestone.", True),
    ("is a spider an insect", "Spiders are arachnids. Unlike insects, which have six legs, spiders have eight legs and no antennae.", False),
    ("can sound travel through space", "Sound is a vibration that needs a medium such as air or water, so it cannot travel through the near vacuum of space.", False),
    ("is the pacific the largest ocean on earth", "The Pacific Ocean is the largest and deepest of Earth's five oceanic divisions.", True),
    ("is mount everest in the alps", "Mount Everest is in the Himalayas, on the border between Nepal and China.", False),
    ("is a bat a bird", "Bats are mammals of the order Chiroptera; they are the only mammals capable of true flight.", False),
    ("do plants need sunlight to make food", "Plants make their food by photosynthesis, which uses the energy of sunlight to turn water and carbon dioxide into sugar.", True),
    ("is gold a good conductor of electricity", "Gold is a dense, soft metal that conducts electricity well and does not corrode, so it is used in electronics.", True),
    ("can the great wall of china be seen from the moon with the naked eye", "Despite a popular myth, the Great Wall of China cannot be seen with the naked eye from the Moon.", False),
    ("do all snakes lay eggs", "Most snakes lay eggs, but some, such as boa constrictors and many vipers, give birth to live young.", False),
    ("is venus the hottest planet in the solar system", "Although Mercury is closer to the Sun, Venus is the hottest planet because its thick atmosphere traps heat.", True),
    ("is the tomato native to italy", "The tomato originated in western South America and was brought to Europe in the 16th century.", False),
    ("is a dolphin a fish", "Dolphins are aquatic mammals closely related to whales; they breathe air through a blowhole.", False),
    ("is canberra the capital of australia", "Canberra is the capital city of Australia. It was chosen as a compromise between Sydney and Melbourne.", True),
    ("does a leap year have 366 days", "A leap year contains one extra day, February 29, so it has 366 days instead of 365.", True),
    ("is the human heart on the right side of the chest", "The human heart lies in the middle of the chest, slightly to the left of the breastbone.", False),
    ("is the ostrich the largest living bird", "The ostrich is the largest and heaviest living bird; it cannot fly but runs very fast.", True),
    ("is iron attracted to a magnet", "Iron, nickel and cobalt are ferromagnetic metals, which means that they are strongly attracted to magnets.", True),
    ("is pluto still classified as a planet", "In 2006 the International Astronomical Union reclassified Pluto as a dwarf planet.", False),
    ("do koalas eat eucalyptus leaves", "The koala feeds almost entirely on eucalyptus leaves, which are low in nutrients.", True),
    ("is the amazon river in africa", "The Amazon River flows through South America, mainly through Brazil, Peru and Colombia.", False),
    ("is water made of hydrogen and oxygen", "A water molecule consists of two hydrogen atoms bonded to one oxygen atom.", True),
    ("is a peanut a nut", "Despite its name, the peanut is not a true nut; it is a legume, like peas and beans.", False),
    ("does ice float on water", "Ice is less dense than liquid water, so it floats.", True),
    ("is the blue whale the largest animal ever known", "The blue whale is a marine mammal and the largest animal known to have ever existed.", True),
    ("was the eiffel tower built for a world's fair", "The Eiffel Tower was built as the entrance arch to the 1889 World's Fair in Paris.", True),
    ("are tomatoes and potatoes in the same plant family", "Tomatoes and potatoes both belong to the nightshade family, Solanaceae.", True),
    ("is chess played on a ten by ten board", "Chess is played on a square board of eight rows and eight columns.", False),
    ("can humans breathe underwater without equipment", "Humans need to breathe air and cannot take oxygen from water without breathing equipment.", False),
    ("is the equator the longest line of latitude", "The Equator is the longest circle of latitude on Earth, about 40,075 km long.", True),
    ("is a kilogram heavier than a pound", "One kilogram is equal to about 2.2 pounds.", True),
]
# (goal, correct solution, wrong solution)
PIQA = [
    ("How do you keep bread fresh for longer?", "Store it in a sealed bag at room temperature.", "Leave it uncovered on the counter."),
    ("To cool down a hot cup of tea quickly,", "add an ice cube to it.", "put it in the oven for a minute."),
    ("How do I open a jar with a tight lid?", "Run the lid under hot water, then twist it.", "Put the jar in the freezer, then twist it."),
    ("To dry wet shoes overnight,", "stuff them with crumpled newspaper.", "fill them with warm water."),
    ("How can I light up a dark room?", "Turn on a lamp.", "Close the curtains."),
    ("To remove a splinter from a finger,", "pull it out with clean tweezers.", "press it deeper with your thumb."),
    ("How do you keep cut flowers fresh?", "Put their stems in a vase of water.", "Keep them in a dry drawer."),
    ("To stop a door from squeaking,", "oil the hinges.", "paint the doorknob."),
    ("How do you make a cup of tea?", "Steep a tea bag in hot water for a few minutes.", "Soak a tea bag in cold milk for a few seconds."),
    ("To clean a dirty window,", "wipe it with soapy water and dry it with a cloth.", "rub it with a handful of mud."),
    ("How can I keep soup hot while traveling?", "Pour it into a sealed thermos.", "Pour it into a paper bag."),
    ("To warm up cold hands,", "rub them together quickly.", "hold a snowball."),
    ("How do you sharpen a pencil?", "Turn it in a pencil sharpener.", "Dip the tip in glue."),
    ("To keep milk from spoiling,", "keep it in the refrigerator.", "leave it on a sunny windowsill."),
    ("How do you boil an egg?", "Place it in a pot of boiling water for about ten minutes.", "Place it in a glass of cold milk for about ten minutes."),
    ("To unclog a kitchen sink,", "use a plunger over the drain.", "pour a bag of flour into the drain."),
    ("How can I keep my phone screen from getting scratched?", "Apply a screen protector.", "Carry it in a pocket full of keys."),
    ("To make ice cubes,", "fill a tray with water and put it in the freezer.", "fill a tray with water and put it in the oven."),
    ("How do you hang a picture on a wall?", "Hammer a nail into the wall and hang the frame on it.", "Tape the frame to the floor."),
    ("To find a book in a library,", "search the catalog for its title.", "read every book on the shelves."),
    ("How do you stop a nosebleed?", "Lean forward and pinch the soft part of the nose.", "Lie flat and blow your nose hard."),
    ("To keep ants out of the sugar,", "store the sugar in a sealed container.", "leave the sugar bag open on the floor."),
    ("How can I soften hard brown sugar?", "Put it in a sealed bag with a slice of bread overnight.", "Leave it in the sun for a week."),
    ("To water a large garden,", "use a garden hose.", "use a hair dryer."),
    ("How do you tie a shoe?", "Cross the laces, loop them and pull them into a bow.", "Cut the laces off."),
    ("To remove a fresh stain from a white shirt,", "soak it in cold water with detergent.", "iron the stain at high heat."),
    ("How do I make toast?", "Put a slice of bread in a toaster.", "Put a slice of bread in the freezer."),
    ("To protect your skin at the beach,", "apply sunscreen before going outside.", "rub cooking oil on it every hour."),
    ("How do you measure the length of a table?", "Stretch a tape measure along its edge.", "Weigh it on a bathroom scale."),
    ("To keep a candle from dripping,", "put it in the freezer for an hour before lighting it.", "soak it in hot water before lighting it."),
    ("How can I carry many groceries at once?", "Use a few sturdy reusable bags.", "Hold every item in your bare hands."),
    ("To peel a hard-boiled egg easily,", "cool it in ice water first.", "heat it in the microwave first."),
    ("How do you put out a small grease fire in a pan?", "Turn off the heat and cover the pan with a metal lid.", "Pour a glass of water on it."),
    ("To keep bananas from ripening too fast,", "keep them away from other fruit.", "seal them in a bag with ripe apples."),
    ("How do you wake up on time in the morning?", "Set an alarm clock the night before.", "Stay up as late as possible."),
    ("To clean a brush after using oil paint,", "rinse it in paint thinner.", "leave it to dry with the paint on it."),
]
# (context, question, correct answer, wrong answer, wrong answer)
SIQA = [
    ("Alex forgot his lunch at home and had nothing to eat all day.", "How would Alex feel afterwards?", "hungry", "full", "proud"),
    ("Sam helped her elderly neighbor carry heavy boxes up the stairs.", "How would the neighbor feel as a result?", "grateful", "angry", "bored"),
    ("Jordan studied every night for two weeks before the exam.", "Why did Jordan do this?", "to pass the exam", "to fail the exam", "to stay up late"),
    ("Riley gave her best friend a birthday present.", "What will the friend want to do next?", "thank Riley", "throw the present away", "forget Riley"),
    ("Casey knocked over a glass and it broke on the floor.", "What will Casey want to do next?", "clean up the pieces", "break another glass", "walk on the glass"),
    ("Taylor won first place in the school race.", "How would Taylor feel?", "happy", "sad", "scared"),
    ("Morgan was late for work for the third time this week.", "What will Morgan's boss want to do?", "talk to Morgan about it", "give Morgan a raise", "take Morgan out to lunch"),
    ("Jamie cooked a big dinner for the whole family.", "What will the family want to do next?", "eat the dinner", "go to sleep hungry", "wash the car"),
    ("Quinn could not find her keys before leaving the house.", "What does Quinn need to do?", "look for the keys", "buy a new house", "paint the door"),
    ("Lee told a funny joke at the party.", "How would others feel as a result?", "amused", "insulted", "hungry"),
    ("Pat watered the garden every morning during the hot summer.", "Why did Pat do this?", "to keep the plants alive", "to flood the house", "to waste water"),
    ("Drew saved part of his allowance every week for months.", "Why did Drew do this?", "to buy something special", "to lose the money", "to make his parents angry"),
    ("Kim apologized to her brother for breaking his toy.", "How would her brother feel as a result?", "more forgiving", "insulted", "lost"),
    ("Max fell off his bike and scraped his knee.", "What will Max want to do next?", "clean the scrape", "run a marathon", "ride faster"),
    ("Ava painted a picture and gave it to her mother.", "How would her mother feel?", "touched", "annoyed", "afraid"),
    ("Noah missed the last bus home.", "What will Noah need to do next?", "find another way home", "wait for tomorrow's class", "buy a bus"),
    ("Mia shared her umbrella with a stranger in the rain.", "How would others describe Mia?", "kind", "selfish", "lazy"),
    ("Eli practiced the piano for hours every day.", "Why did Eli do this?", "to get better at playing", "to break the piano", "to annoy the teacher"),
    ("Sydney forgot her friend's birthday.", "How would Sydney feel afterwards?", "guilty", "excited", "relaxed"),
    ("Robin found a wallet on the street and returned it to its owner.", "How would the owner feel?", "thankful", "upset", "confused"),
    ("Cameron decided to have a barbecue and invited all her friends.", "What will her friends want to do?", "attend the barbecue", "stay home alone", "call the police"),
    ("Jesse spilled coffee on his shirt right before the interview.", "What will Jesse want to do?", "clean the shirt quickly", "drink more coffee", "go back to bed"),
    ("Kendall stayed up all night finishing her project.", "How would Kendall feel the next day?", "tired", "well rested", "bored"),
    ("Bailey lent his notes to a classmate who had been sick.", "What will the classmate want to do next?", "copy the notes", "tear up the notes", "hide from Bailey"),
    ("Addison moved to a new city where she knew nobody.", "What will Addison want to do?", "make new friends", "stop talking", "never leave home"),
    ("Skylar got a puppy for her birthday.", "What does Skylar need to do next?", "feed the puppy", "sell the puppy", "ignore the puppy"),
    ("Aubrey yelled at her little brother for no reason.", "How would her brother feel?", "hurt", "proud", "sleepy"),
    ("Carson trained for months and finished his first marathon.", "How would Carson feel?", "accomplished", "ashamed", "forgetful"),
    ("Remy wanted to learn to cook, so he signed up for a class.", "What will Remy want to do next?", "go to the class", "order takeout every night", "sell his kitchen"),
    ("Tracy cleaned the whole house before her parents arrived.", "Why did Tracy do this?", "to make the house look nice", "to make a mess", "to hide from her parents"),
    ("Kai broke his leg playing soccer.", "What will Kai need to do?", "see a doctor", "play another game", "climb a tree"),
    ("Jordan's dog ran away during the storm.", "How would Jordan feel?", "worried", "cheerful", "indifferent"),
    ("Lee forgot to set an alarm and woke up late.", "What will Lee want to do next?", "hurry to get ready", "go back to sleep", "cook a long breakfast"),
    ("Ash retook the test they had failed and passed it.", "How would Ash feel as a result?", "relieved", "angry", "lonely"),
    ("Sasha won tickets to a concert and took her sister along.", "How would her sister feel?", "excited", "jealous", "tired"),
    ("Riley saw a child crying alone at the mall.", "What will Riley want to do?", "help the child find their parents", "laugh at the child", "leave the mall"),
]
# (sentence, option1, option2, answer)
WINOGRANDE = [
    ("The trophy doesn't fit into the brown suitcase because the _ is too large.", "trophy", "suitcase", "1"),
    ("The trophy doesn't fit into the brown suitcase because the _ is too small.", "trophy", "suitcase", "2"),
    ("Maria lent her book to Anna because _ had already finished reading it.", "Maria", "Anna", "1"),
    ("John couldn't lift the box onto the shelf because the _ was too heavy.", "John", "box", "2"),
    ("The ice cube melted before the stone did because the _ was made of water.", "ice cube", "stone", "1"),
    ("Sarah called Beth to thank her because _ had helped her move last weekend.", "Sarah", "Beth", "2"),
    ("The dog chased the cat up the street until the _ escaped by climbing a tree.", "dog", "cat", "2"),
    ("The car passed the bicycle on the hill because the _ had a powerful engine.", "car", "bicycle", "1"),
    ("Tom gave Jim his coat because _ was shivering in the cold.", "Tom", "Jim", "2"),
    ("The pen ran out of ink before the marker because the _ was used more often.", "pen", "marker", "1"),
    ("Kate beat Lily at chess easily because _ had practiced every day for years.", "Kate", "Lily", "1"),
    ("The window shattered but the wall was fine because the _ was fragile.", "window", "wall", "1"),
    ("Ben asked Carl for directions because _ had lived in the city for years.", "Ben", "Carl", "2"),
    ("The boat sank while the raft floated because the _ had a hole in it.", "boat", "raft", "1"),
    ("The shirt dried much faster than the towel because the _ was thin.", "shirt", "towel", "1"),
    ("Emily wanted to borrow Jessica's dress because _ had nothing to wear to the party.", "Emily", "Jessica", "1"),
    ("The glass was harder to clean than the plate because the _ had a narrow opening.", "glass", "plate", "1"),
    ("Natalie was a better swimmer than Rachel because _ had taken lessons since she was young.", "Natalie", "Rachel", "1"),
    ("Natalie was a worse swimmer than Rachel because _ had never taken lessons.", "Natalie", "Rachel", "1"),
    ("Kevin had to pay Robert back because _ had lent him fifty dollars.", "Kevin", "Robert", "2"),
    ("The soup was too salty for Megan but not for Laura, because _ liked salty food.", "Megan", "Laura", "2"),
    ("I put the milk in the fridge instead of the cupboard because the _ is cold.", "fridge", "cupboard", "1"),
    ("The hammer cracked the nut but not the rock because the _ was softer.", "nut", "rock", "1"),
    ("Lisa asked Monica to check her essay because _ was an excellent writer.", "Lisa", "Monica", "2"),
    ("The cat preferred the blanket to the floor because the _ was warm and soft.", "blanket", "floor", "1"),
    ("Derrick was taller than Brian, so _ had to duck when walking through the low door.", "Derrick", "Brian", "1"),
    ("Derrick was taller than Brian, so _ could not reach the top shelf.", "Derrick", "Brian", "2"),
    ("The medicine worked better than the tea for the cough because the _ was stronger.", "medicine", "tea", "1"),
    ("Amy read the book but skipped the movie because the _ had better reviews.", "book", "movie", "1"),
    ("Jason always beat Kyle at tennis, because _ had a much faster serve.", "Jason", "Kyle", "1"),
    ("The bucket overflowed but the barrel did not because the _ was smaller.", "bucket", "barrel", "1"),
    ("Rebecca taught Jennifer how to knit, since _ was a beginner.", "Rebecca", "Jennifer", "2"),
    ("The phone died before the laptop because the _ had a smaller battery.", "phone", "laptop", "1"),
    ("Patricia hired Angela to fix the roof because _ was a skilled roofer.", "Patricia", "Angela", "2"),
    ("The lake froze over before the river because the _ water was still.", "lake", "river", "1"),
    ("Victoria had to wake up Sarah because _ had slept through the alarm.", "Victoria", "Sarah", "2"),
]
# (question, correct answer, wrong answers)
ARC_EASY = [
    ("Which of these is a source of light?", "the Sun", ["a rock", "a shadow", "a mirror"]),
    ("What do plants need to make their own food?", "sunlight", ["darkness", "sand", "plastic"]),
    ("Which state of matter has a definite shape?", "solid", ["gas", "liquid", "steam"]),
    ("What force pulls objects toward the center of Earth?", "gravity", ["magnetism", "friction", "wind"]),
    ("Which animal is a mammal?", "dolphin", ["shark", "frog", "eagle"]),
    ("What happens to liquid water when it freezes?", "It becomes a solid.", ["It becomes a gas.", "It disappears.", "It becomes salt."]),
    ("Which organ pumps blood through the human body?", "heart", ["lungs", "stomach", "brain"]),
    ("Which tool is used to measure temperature?", "thermometer", ["ruler", "balance", "clock"]),
    ("What causes day and night on Earth?", "Earth rotating on its axis", ["the Moon changing phases", "clouds blocking the Sun", "ocean tides"]),
    ("Which material is the best conductor of electricity?", "copper", ["wood", "rubber", "glass"]),
    ("Which of these is a renewable resource?", "solar energy", ["coal", "oil", "natural gas"]),
    ("What do bees collect from flowers to make honey?", "nectar", ["pebbles", "soil", "leaves"]),
    ("Which planet is closest to the Sun?", "Mercury", ["Earth", "Mars", "Venus"]),
    ("Which part of a plant takes in water from the soil?", "roots", ["flowers", "leaves", "fruit"]),
    ("Which organism is a producer in a food chain?", "grass", ["rabbit", "fox", "hawk"]),
    ("What forms when water vapor in the air cools and condenses?", "clouds", ["rocks", "soil", "sand"]),
    ("Which body system breaks down food into nutrients?", "digestive system", ["skeletal system", "nervous system", "muscular system"]),
    ("Which of these is the best way to conserve water?", "turning off the tap while brushing teeth", ["taking longer showers", "watering the lawn at noon", "washing half-empty loads of laundry"]),
    ("A student stirs salt into water until the salt disappears. What has the student made?", "a solution", ["a solid", "a gas"]),
    ("Which unit is used to measure the mass of an object?", "gram", ["meter", "liter", "degree"]),
    ("What is the main job of the lungs?", "to take in oxygen", ["to digest food", "to pump blood", "to support the body"]),
    ("Which change is a chemical change?", "wood burning", ["ice melting", "paper being cut", "water boiling"]),
    ("Which simple machine is a ramp?", "inclined plane", ["pulley", "lever", "wheel and axle"]),
    ("Which animal hatches from an egg?", "chicken", ["cow", "horse", "dog"]),
    ("What does a compass needle point toward?", "magnetic north", ["the Sun", "the Moon", "the nearest ocean"]),
    ("Which sense organ is used to detect sound?", "ear", ["nose", "tongue", "skin"]),
    ("What is the boiling point of water at sea level?", "100 degrees Celsius", ["0 degrees Celsius", "50 degrees Celsius", "212 degrees Celsius"]),
    ("Which layer of Earth do people live on?", "crust", ["mantle", "outer core", "inner core"]),
    ("Which of these animals is a reptile?", "lizard", ["salmon", "toad", "robin"]),
    ("Which activity uses energy from the wind?", "flying a kite", ["riding a bicycle", "reading a book", "eating lunch"]),
    ("Why do people wear light-colored clothing on hot days?", "Light colors reflect sunlight.", ["Light colors absorb sunlight.", "Light colors are heavier.", "Light colors make wind."]),
    ("What do roots anchor a plant into?", "soil", ["air", "sunlight", "flowers"]),
    ("Which object is attracted to a magnet?", "an iron nail", ["a plastic spoon", "a wooden block", "a rubber band"]),
    ("What is the closest star to Earth?", "the Sun", ["Polaris", "Sirius", "the Moon"]),
    ("Which of these is a property of a gas?", "It fills its container.", ["It has a fixed shape.", "It cannot be compressed.", "It is always visible."]),
    ("How many legs does an insect have?", "six", ["four", "eight", "ten", "twelve"]),
]
ARC_CHALLENGE = [
    ("A student puts a metal spoon and a plastic spoon in a cup of hot water. After a minute the metal spoon feels hotter. Which property of metal explains this?", "Metal is a good conductor of heat.", ["Metal is a good insulator.", "Metal is attracted to magnets.", "Metal has a high melting point."]),
    ("Which process in the water cycle is most directly powered by energy from the Sun?", "evaporation", ["precipitation", "runoff", "infiltration"]),
    ("A ball rolls across a rug and slows to a stop. Which force causes the ball to stop?", "friction", ["gravity", "magnetism", "buoyancy"]),
    ("Which characteristic would best help a plant survive in a desert?", "a thick waxy stem that stores water", ["large thin leaves", "shallow weak roots", "bright colorful petals"]),
    ("In pea plants, tall is dominant over short. Two plants that each carry one tall and one short allele are crossed. What fraction of the offspring is expected to be short?", "1/4", ["0", "1/2", "3/4", "1"]),
    ("Which of these best explains why the Moon appears to change shape during a month?", "Different amounts of its lit half are visible from Earth.", ["Earth's shadow covers different parts of it.", "Clouds block parts of it.", "Its size changes as it orbits."]),
    ("Which statement best describes the role of decomposers in an ecosystem?", "They return nutrients from dead organisms to the soil.", ["They make food from sunlight.", "They hunt other consumers.", "They pollinate flowers."]),
    ("A scientist wants to find out whether a fertilizer increases plant growth. Which is the best control for the experiment?", "identical plants grown without the fertilizer", ["plants given twice as much fertilizer", "plants grown in a different light", "plants of a different species"]),
    ("Which energy transformation takes place in a battery-powered flashlight?", "chemical energy to light energy", ["light energy to chemical energy", "sound energy to light energy", "heat energy to chemical energy"]),
    ("Why does a metal lid loosen on a glass jar when it is held under hot water?", "The metal expands more than the glass.", ["The glass expands more than the metal.", "The water dissolves the glue.", "The metal shrinks when heated."]),
    ("Which gas released by burning fossil fuels is most associated with global warming?", "carbon dioxide", ["oxygen", "nitrogen", "helium"]),
    ("Which feature of Earth's surface is formed mainly where two continental plates collide?", "mountain ranges", ["river deltas", "sand dunes", "glacial lakes"]),
    ("A cell has a cell wall and chloroplasts. The cell most likely came from", "a plant", ["an animal", "a virus", "a fungus"]),
    ("Which of the following is an example of a learned behavior?", "a dog sitting on command", ["a spider spinning a web", "a bird migrating south", "a baby crying when hungry"]),
    ("Which property of water allows insects such as water striders to walk on its surface?", "surface tension", ["a high boiling point", "a low density", "the ability to dissolve salt"]),
    ("What is the main reason that the polar regions are colder than the equator?", "Sunlight strikes the poles at a low angle.", ["The poles are much farther from the Sun.", "The poles have more clouds.", "The poles have more wind."]),
    ("Which is the best evidence that a chemical reaction has occurred?", "A gas is produced when two liquids are mixed.", ["Ice melts in a warm room.", "Sugar dissolves in tea.", "A glass breaks into pieces."]),
    ("Which human body systems work together most directly to deliver oxygen to the muscles?", "respiratory and circulatory", ["digestive and skeletal", "nervous and excretory", "immune and reproductive"]),
    ("A sound wave travels from air into water. What happens to its speed?", "It increases.", ["It decreases.", "It stays the same.", "It drops to zero."]),
    ("Which energy source produces electricity without any moving parts?", "solar cells", ["wind turbines", "hydroelectric dams", "tidal turbines"]),
    ("Which change would most likely cause a population of rabbits to decrease?", "an increase in the number of foxes", ["an increase in the amount of grass", "a mild winter", "a decrease in the number of hawks"]),
    ("What is the smallest unit of an element that keeps the properties of that element?", "an atom", ["a molecule", "a cell", "a compound"]),
    ("Fossils of tropical plants are found in rock layers in Antarctica. What does this most likely show?", "Antarctica once had a warmer climate.", ["Tropical plants grow in ice today.", "The fossils were carried there by birds.", "Antarctica has always been cold."]),
    ("Which action would most reduce the amount of waste sent to a landfill?", "reusing glass jars for storage", ["buying bottled water", "using paper plates", "throwing away old clothes"]),
    ("Which object has the greatest kinetic energy?", "a truck moving at highway speed", ["a parked truck", "a rolling marble", "a walking person"]),
    ("Why are the seasons reversed in the Northern and Southern Hemispheres?", "Earth's axis is tilted.", ["Earth's orbit is a perfect circle.", "The Moon blocks sunlight.", "The Sun gets hotter and cooler."]),
    ("A plant on a windowsill bends toward the window. This response is called", "phototropism", ["gravitropism", "photosynthesis", "transpiration"]),
    ("Which material would be the best insulator for the handle of a cooking pot?", "wood", ["copper", "aluminum", "iron"]),
    ("Which layer of the atmosphere contains the ozone that absorbs most ultraviolet radiation?", "stratosphere", ["troposphere", "mesosphere", "thermosphere"]),
    ("In which type of rock are fossils most often found?", "sedimentary", ["igneous", "metamorphic", "volcanic"]),
    ("Which statement describes a difference between weather and climate?", "Weather changes daily, while climate is the average over many years.", ["Climate changes daily, while weather is the average over many years.", "Weather is only about rain.", "Climate is only about temperature."]),
    ("What is the main function of white blood cells?", "fighting infections", ["carrying oxygen", "clotting blood", "digesting food"]),
    ("Which change would most likely increase the rate at which sugar dissolves in water?", "stirring the water", ["using larger sugar cubes", "cooling the water", "using a taller glass"]),
    ("Which tool would a student use to observe the cells of an onion skin?", "a microscope", ["a telescope", "a thermometer", "a barometer"]),
    ("Which movement of Earth defines the length of a year?", "Earth revolving around the Sun", ["Earth rotating on its axis", "the Moon revolving around Earth", "the Sun rotating on its axis"]),
    ("Which is an inherited trait of a human?", "eye color", ["a scar from an injury", "the ability to ride a bike", "the language a person speaks"]),
]
OBQA = [
    ("A magnet will stick to", "an iron nail", ["a wooden spoon", "a glass cup", "a paper towel"]),
    ("Plants take in carbon dioxide through their", "leaves", ["roots", "petals", "seeds"]),
    ("When the weather gets very cold, a pond may", "freeze over", ["boil away", "glow at night", "turn to sand"]),
    ("An example of a renewable resource is", "wind", ["coal", "oil", "gasoline"]),
    ("Sound travels fastest through", "steel", ["a vacuum", "air", "smoke"]),
    ("A caterpillar will eventually become a", "butterfly", ["frog", "bird", "fish"]),
    ("To see the surface of a distant planet, one would use a", "telescope", ["microscope", "magnifying glass", "stethoscope"]),
    ("Evaporation turns liquid water into", "water vapor", ["ice", "salt", "sand"]),
    ("An animal that eats only plants is", "an herbivore", ["a carnivore", "a predator", "a decomposer"]),
    ("The moon can be seen at night because it", "reflects sunlight", ["makes its own light", "is on fire", "is a star"]),
    ("A seed needs water and warmth in order to", "germinate", ["melt", "freeze", "rust"]),
    ("Rubbing two hands together quickly produces", "heat", ["cold", "light", "water"]),
    ("Copper wire is used in houses because it conducts", "electricity", ["sound", "darkness", "cold"]),
    ("Fossils are most often found in", "sedimentary rock", ["clouds", "lava", "the ocean surface"]),
    ("A compass needle points north because of", "Earth's magnetic field", ["the wind", "the Sun's heat", "the Moon's gravity"]),
    ("Rain falls from clouds to the ground because of", "gravity", ["magnetism", "sunlight", "friction"]),
    ("The heart of an animal pumps", "blood", ["air", "food", "bile"]),
    ("A shadow is formed when an object blocks", "light", ["sound", "heat", "air"]),
    ("Leaves are green because they contain", "chlorophyll", ["iron", "salt", "plastic"]),
    ("Which of these lets heat travel through it most easily?", "a metal pot", ["a wooden spoon", "a wool mitten", "a foam cup"]),
    ("If a person wants to stay dry in the rain, they should wear", "a waterproof coat", ["a cotton shirt", "a paper hat", "a wool sweater"]),
    ("Animals that hunt other animals for food are called", "predators", ["producers", "prey", "plants"]),
    ("A rainbow is formed when sunlight is", "bent by raindrops", ["absorbed by clouds", "blocked by the Moon", "reflected by grass"]),
    ("Over many years, a river flowing through a canyon will", "make the canyon deeper", ["fill the canyon with lava", "turn the canyon to ice", "make the canyon shallower"]),
    ("A bird builds a nest in order to", "protect its eggs", ["hide from the sun", "store water", "find food"]),
    ("In the Northern Hemisphere, the days are longest during", "summer", ["winter", "autumn", "spring"]),
    ("Which is most likely to conduct electricity?", "a silver spoon", ["a rubber glove", "a plastic cup", "a cotton shirt"]),
    ("Recycling aluminum cans helps to", "conserve natural resources", ["increase pollution", "use more energy", "create more trash"]),
    ("A houseplant will grow toward", "a source of light", ["a dark corner", "a loud noise", "a cold wind"]),
    ("Water boils when it reaches", "its boiling point", ["its freezing point", "room temperature", "zero degrees Celsius"]),
    ("An example of a mixture is", "a salad", ["pure water", "oxygen gas", "gold"]),
    ("Bats use echoes to", "find their way in the dark", ["make light", "grow feathers", "stay warm"]),
    ("Bears eat large amounts of food before winter in order to", "store energy for hibernation", ["grow taller", "change color", "learn to swim"]),
    ("The Earth takes about 365 days to", "orbit the Sun", ["spin once on its axis", "orbit the Moon", "cross the Milky Way"]),
    ("Melting is a change from", "solid to liquid", ["liquid to gas", "gas to liquid", "liquid to solid"]),
    ("A thermometer is used to measure", "temperature", ["weight", "length", "time"]),
]
N_TRAIN = 24


def place(i: int, correct: str, wrong: list[str]) -> tuple[list[str], int]:
    """The options with the correct one inserted at index ``(7 * i + 1) % n``."""
    k = (7 * i + 1) % (len(wrong) + 1)
    return wrong[:k] + [correct] + wrong[k:], k


def arc_row(i: int, row, ids: list[str], digits: bool) -> dict:
    question, correct, wrong = row
    texts, k = place(i, correct, wrong)
    labels = [str(j + 1) for j in range(len(texts))] if digits else list("ABCDE"[: len(texts)])
    return {"id": ids[i % len(ids)].format(i), "question": question, "choices": {"text": texts, "label": labels}, "answerKey": labels[k]}


def rows(task: str) -> list[dict]:
    if task == "boolq":
        return [{"question": q, "passage": p, "answer": a} for q, p, a in BOOLQ]
    if task == "piqa":
        out = []
        for i, (goal, correct, wrong) in enumerate(PIQA):
            sols, k = place(i, correct, [wrong])
            out.append({"goal": goal, "sol1": sols[0], "sol2": sols[1], "label": k})
        return out
    if task == "siqa":
        out = []
        for i, (context, question, correct, *wrong) in enumerate(SIQA):
            answers, k = place(i, correct, wrong)
            out.append({"context": context, "question": question, **{f"answer{c}": a for c, a in zip("ABC", answers)}, "label": str(k + 1)})
        return out
    if task == "winogrande":
        return [{"sentence": s, "option1": o1, "option2": o2, "answer": a} for s, o1, o2, a in WINOGRANDE]
    if task == "arc_easy":  # a few records use digit labels ("1".."4"), as some real ARC records do
        ids = ["Mercury_SC_40{:04d}", "MCAS_2004_4_{}", "NYSEDREGENTS_2012_4_{}", "MDSA_2008_5_{}"]
        return [arc_row(i, r, ids, digits=i % 9 == 4) for i, r in enumerate(ARC_EASY)]
    if task == "arc_challenge":
        ids = ["Mercury_71{:05d}", "MCAS_2011_8_{}", "NYSEDREGENTS_2015_8_{}", "TIMSS_2003_8_pg{}"]
        return [arc_row(i, r, ids, digits=i % 9 == 7) for i, r in enumerate(ARC_CHALLENGE)]
    out = []
    for i, (stem, correct, wrong) in enumerate(OBQA):
        texts, k = place(i, correct, wrong)
        out.append({"id": f"{7 + i % 3}-{(i * 277) % 1000}", "question_stem": stem, "choices": {"text": texts, "label": list("ABCD")}, "answerKey": "ABCD"[k]})
    return out


def _numbered(name: str, options: list[str]) -> str:
    body = "".join(f"\n\n{name.capitalize()}{j + 1}: {o}" for j, o in enumerate(options))
    return body + "\n\nAnswer format: " + "/".join(f"{name}{j + 1}" for j in range(len(options)))


def instruction(task: str, r: dict) -> tuple[str, str]:
    """(instruction, answer) of a record in the LLM-Adapters commonsense_170k wording."""
    if task == "boolq":
        return f"Please answer the following question with true or false, question: {r['question']}?\n\nAnswer format: true/false", str(r["answer"]).lower()
    if task == "piqa":
        return f"Please choose the correct solution to the question: {r['goal']}" + _numbered("solution", [r["sol1"], r["sol2"]]), f"solution{r['label'] + 1}"
    if task == "siqa":
        options = [r["answerA"], r["answerB"], r["answerC"]]
        return f"Please choose the correct answer to the question: {r['context']} {r['question']}" + _numbered("answer", options), f"answer{r['label']}"
    if task == "winogrande":
        head = "Please choose the correct answer to fill in the blank to complete the given sentence: "
        return head + r["sentence"] + _numbered("option", [r["option1"], r["option2"]]), f"option{r['answer']}"
    question = r.get("question") or r["question_stem"]
    texts, labels = r["choices"]["text"], r["choices"]["label"]
    return f"Please choose the correct answer to the question: {question}" + _numbered("answer", texts), f"answer{labels.index(r['answerKey']) + 1}"


def instructions(per_task: int = 5) -> list[dict]:
    out = []
    for task in ("boolq", "piqa", "siqa", "winogrande", "arc_easy", "arc_challenge", "obqa"):
        for r in rows(task)[:per_task]:
            text, answer = instruction(task, r)
            out.append({"instruction": text, "input": "", "output": f"the correct answer is {answer}", "answer": answer})
    return out


if __name__ == "__main__":
    root = pathlib.Path(__file__).parent / "sample_data"
    for task in ("boolq", "piqa", "siqa", "winogrande", "arc_easy", "arc_challenge", "obqa"):
        records = rows(task)
        (root / task).mkdir(parents=True, exist_ok=True)
        for split, part in (("train", records[:N_TRAIN]), ("validation", records[N_TRAIN:])):
            with open(root / task / f"{split}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in part)
    with open(root / "commonsense_mini.json", "w") as f:
        json.dump(instructions(), f, indent=1)
